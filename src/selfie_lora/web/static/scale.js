// The Generate page's LoRA scale slider (templates/generate.html): shown only with scripts,
// since the number field beside it is what the form sends (a range snaps a stored scale such
// as 0.73 to its step of 0.05). Each follows the other; the slider's own value is what a
// screen reader reads as it moves, once (no live region repeats it).
(() => {
  const field = document.getElementById("lora_scale");
  const slider = document.getElementById("scale-slider");
  if (!field || !slider) return;
  slider.hidden = false;
  slider.addEventListener("input", () => {
    // Hundredths: the steps are 0.05, but a sum of them can come out as 0.8500000000000001.
    field.value = String(Math.round(Number(slider.value) * 100) / 100);
  });
  field.addEventListener("input", () => {
    // Only a value the field takes: half-typed ("0.", "-") or out of range, the slider waits.
    if (field.value !== "" && field.checkValidity()) slider.value = field.value;
  });
  // "Save the scale" skips the form's checks (formnovalidate: an empty prompt must not block
  // it), this field's range too, so it checks this field alone: an empty or out-of-range scale
  // is said beside it, as Generate's check does, instead of the server's refusal. Empty is no
  // error for Generate (the saved scale), so that message is this button's only, cleared as
  // soon as the field is typed in or left.
  const save = document.getElementById("save-scale");
  const clear = () => field.setCustomValidity("");
  field.addEventListener("input", clear);
  field.addEventListener("blur", clear);
  save?.addEventListener("click", (e) => {
    if (field.value === "") {
      field.setCustomValidity(`Type the scale to save: a number from ${field.min} to ${field.max}.`);
    }
    if (!field.checkValidity()) {
      e.preventDefault();
      field.reportValidity();
    }
  });
})();
