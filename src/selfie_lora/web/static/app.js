// selfie-lora's pages: the upload (drag and drop, thumbnails, progress, the per-photo report),
// confirmations, copy buttons and prompt presets (the scale slider: scale.js). No inline scripts (CSP).
"use strict";

(function () {
  // The root path the app is served under ("" at a host's root, "/sl" behind a prefix).
  const root = document.documentElement.dataset.root ?? "";
  const csrf = () => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  };

  // ---------------------------------------------------------------- upload
  const form = document.getElementById("upload");
  if (form) {
    const input = document.getElementById("files");
    const drop = document.getElementById("drop");
    const previews = document.getElementById("previews");
    const progress = document.getElementById("progress");
    const status = document.getElementById("upload-status");
    const report = document.getElementById("report");
    let chosen = [];
    let sent = [];  // the files of the upload whose report is on the page
    // Pictures by the file itself, not its name: a file chosen later under the same name (a
    // better photo saved over the first, another camera's IMG_0001.JPG) is another picture.
    const urls = new Map();

    const urlFor = (file) => {
      if (!urls.has(file)) urls.set(file, URL.createObjectURL(file));
      return urls.get(file);
    };
    const forget = () => {
      // The pictures of files neither chosen nor in the report on the page are let go.
      for (const [file, url] of urls) {
        if (!chosen.includes(file) && !sent.includes(file)) {
          URL.revokeObjectURL(url);
          urls.delete(file);
        }
      }
    };
    const isImage = (file) => /^image\//.test(file.type) && !/hei[cf]$/i.test(file.name);

    // The name each file is sent under: its own or, where an earlier one has it (two cameras'
    // IMG_0001.JPG), "IMG_0001 (2).JPG": the server refuses two photos of one name (folded
    // as it folds them).
    const fold = (name) => name.normalize("NFC").toLowerCase();
    const namesFor = (files) => {
      const used = new Set();
      return files.map((file) => {
        const dot = file.name.lastIndexOf(".");
        const stem = dot > 0 ? file.name.slice(0, dot) : file.name;
        const ext = dot > 0 ? file.name.slice(dot) : "";
        let name = file.name;
        for (let n = 2; used.has(fold(name)); n += 1) name = `${stem} (${n})${ext}`;
        used.add(fold(name));
        return name;
      });
    };
    // One file on the device, chosen twice (picked, then dropped again), is sent once.
    const sameFile = (a, b) =>
      a.name === b.name && a.size === b.size && a.lastModified === b.lastModified;
    const add = (files) => {
      for (const file of files) {
        if (!chosen.some((c) => sameFile(c, file))) chosen.push(file);
      }
    };

    const show = () => {
      previews.replaceChildren();
      const names = namesFor(chosen);
      chosen.forEach((file, index) => {
        const li = document.createElement("li");
        const figure = document.createElement("figure");
        if (isImage(file)) {
          const img = document.createElement("img");
          img.src = urlFor(file);
          img.alt = "";  // the caption names it: an alt of the name was read out twice
          img.width = 96;
          img.height = 96;
          figure.appendChild(img);
        }
        const caption = document.createElement("figcaption");
        caption.textContent = names[index];
        if (names[index] !== file.name) caption.title = `${file.name}, sent as ${names[index]}`;
        figure.appendChild(caption);
        li.appendChild(figure);
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "remove secondary";
        remove.textContent = "Remove";
        remove.setAttribute("aria-label", `Remove ${names[index]}`);
        remove.addEventListener("click", () => {
          chosen.splice(index, 1);
          show();
          // Focus stays in the list (the next file's button), or goes back to the picker.
          const buttons = previews.querySelectorAll("button.remove");
          (buttons[Math.min(index, buttons.length - 1)] ?? input).focus();
        });
        li.appendChild(remove);
        previews.appendChild(li);
      });
      status.textContent = chosen.length ? `${chosen.length} file(s) chosen` : "";
      forget();
    };

    input.addEventListener("change", () => { chosen = []; add(Array.from(input.files)); show(); });
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
    }
    for (const name of ["dragleave", "drop"]) {
      drop.addEventListener(name, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      add(Array.from(e.dataTransfer.files));
      show();
    });

    const fillReport = (files, names) => {
      // Thumbnails from the files on this device, and the face box the checks found.
      sent = files;
      forget();
      for (const row of report.querySelectorAll("[data-photo-name]")) {
        // Rows are keyed by the name the photo is stored under (cleaned: NFC, bounded); the
        // name the file was sent under finds it among the files sent.
        const name = row.dataset.originalName ?? row.dataset.photoName;
        const file = files[names.indexOf(name)];
        const img = row.querySelector("img");
        // A skipped file (a Takeout .json) has no picture box: nothing to fill.
        if (!img) continue;
        if (file && isImage(file)) img.src = urlFor(file);
        else if (img.dataset.stored) img.src = img.dataset.stored;  // from a zip: the stored crop
        else img.remove();
        const holder = row.querySelector("[data-box]");
        if (holder && file && isImage(file)) {
          const [l, t, r, b] = holder.dataset.box.split(",").map(Number);
          const box = document.createElement("span");
          box.className = "face-box";
          box.style.left = `${l}%`;
          box.style.top = `${t}%`;
          box.style.width = `${r - l}%`;
          box.style.height = `${b - t}%`;
          holder.appendChild(box);
        }
      }
    };

    const sessionEnded = () => {
      const link = document.createElement("a");
      link.href = root + "/signin?next=/photos";  // and back here after
      link.textContent = "sign in again";
      status.replaceChildren("Your session has ended: ", link, ", then send the photos.");
    };

    const send = document.getElementById("send");
    let sending = false;
    // The input's "required" is for a browser without scripts: here the files chosen may have
    // been dropped (the input stays empty), and the submit below says "Choose some photos first".
    form.noValidate = true;
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      // One upload at a time: a double click sent two, and the server checked and stored the
      // set twice (or refused the second as upload_in_progress, whose answer could come last).
      if (sending) return;
      if (!chosen.length) { status.textContent = "Choose some photos first."; return; }
      const data = new FormData();
      const files = chosen.slice();  // as sent, whatever is chosen while it is checked
      const names = namesFor(files);
      files.forEach((file, index) => data.append("files", file, names[index]));
      // Each name again as a field, sent as it is: a filename carries a '"' as %22 but a '%'
      // as it is, so "100%22off.jpg" read back as '100"off.jpg' and its row found no picture.
      names.forEach((name) => data.append("names", name));
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      progress.hidden = false;
      progress.value = 0;
      status.textContent = "Sending…";
      // The last upload's report goes: one that fails before a report is made (too large, a
      // lost connection) must not leave the previous one's "can be trained on" beside it.
      report.replaceChildren();
      xhr.upload.addEventListener("progress", (ev) => {
        if (ev.lengthComputable) progress.value = Math.round((100 * ev.loaded) / ev.total);
      });
      xhr.upload.addEventListener("load", () => { status.textContent = "Checking your photos…"; });
      xhr.addEventListener("load", () => {
        progress.value = 100;
        if (xhr.status === 401) {
          // The session ended (signed out in another tab, or too old): the server answers
          // the upload 401 before reading it.
          sessionEnded();
        } else if (xhr.getResponseHeader("content-type")?.startsWith("text/html")) {
          // Only the report fragment (our own escaped template, marked data-trainable) goes in
          // the report: any other page (an error page, the sign-in page a lapsed session is
          // sent to) would nest a whole page here. Of those, the message is shown.
          const parsed = new DOMParser().parseFromString(xhr.responseText, "text/html");
          const fragment = parsed.querySelector("body > [data-trainable]");
          if (fragment) {
            report.replaceChildren(document.adoptNode(fragment));
            fillReport(files, names);
            // An upload stored is the current set now: it is shown in place of the old one.
            const current = parsed.querySelector("body > #current-set");
            if (current) document.getElementById("current-set")?.replaceWith(document.adoptNode(current));
            const refused = fragment.querySelector("#upload-refused");
            // "Some photos need changes" only where the report names photos: a refusal of the
            // whole upload (two files of one name in a zip, too many files) says why.
            // Photos left out: the focus to the notice saying how many, kept and left out
            // ("Done." alone left the list of them unread), said once (not in the live
            // region too). All kept: the live region says so, the focus stays on the button.
            const kept = fragment.querySelector("#upload-kept");
            const leftOut = xhr.status === 200 && kept && Number(kept.dataset.leftOut) > 0;
            if (leftOut) kept.focus();
            status.textContent = leftOut ? ""
              : xhr.status === 200 ? `Done: ${kept?.textContent ?? ""}`.replace(/: $/, ".")
              : xhr.status === 422 && fragment.querySelector("[data-photo-name]")
                ? "Some photos need changes."
              : refused?.textContent ?? `The upload failed (${xhr.status}).`;
          } else if (xhr.responseURL && new URL(xhr.responseURL).pathname === root + "/signin") {
            sessionEnded();
          } else {
            const alert = parsed.querySelector('[role="alert"]');
            status.textContent = alert?.textContent ?? `The upload failed (${xhr.status}).`;
          }
        } else {
          let message = `The upload failed (${xhr.status}).`;
          try { message = JSON.parse(xhr.responseText).error.message; } catch (_) { /* keep */ }
          status.textContent = message;
        }
      });
      xhr.addEventListener("error", () => { status.textContent = "The upload failed: check your connection and try again."; });
      // loadend comes after load, error, abort and timeout alike: the button is back whatever
      // the answer.
      // Disabling the focused button dropped the focus to <body>, where a screen reader loses
      // its place: it goes back to the button once the answer is in.
      const refocus = document.activeElement === send;
      xhr.addEventListener("loadend", () => {
        sending = false;
        if (send) send.disabled = false;
        if (refocus && (!document.activeElement || document.activeElement === document.body)) send.focus();
      });
      sending = true;
      if (send) send.disabled = true;
      xhr.send(data);
    });
  }

  // ---------------------------------------------------------------- the Generate form
  // One POST a click, as for the upload's #send: a double click sent two, the browser dropped
  // the first one's answer, but its generation ran on and was stored (two batches, both of
  // the user's in-flight slots). Once the form is sent, another submit (Generate or "Save the
  // scale") is ignored and its buttons are disabled until the next page.
  // The buttons are marked aria-disabled, not disabled: a disabled button loses the focus to
  // <body>, where a screen reader loses its place, and nothing said a generation was running
  // (tens of seconds on a real model). The form's status says what is being made.
  // A click (or Enter, which clicks the form's button) with Shift, Ctrl, Alt or ⌘ sends its
  // form into a new tab or window (or a download), as does a form with a target: this page
  // stays where it is, and its forms must still work. Noted for the submit that click makes
  // (in the same task), forgotten after it.
  let modifiedClick = false;
  document.addEventListener("click", (e) => {
    modifiedClick = e.shiftKey || e.ctrlKey || e.altKey || e.metaKey;
    if (modifiedClick) setTimeout(() => { modifiedClick = false; }, 0);
  }, true);
  const opensElsewhere = (e) => {
    const target = (e.submitter?.getAttribute("formtarget") ?? e.target.getAttribute("target") ?? "")
      .toLowerCase();
    return modifiedClick || (target !== "" && target !== "_self");
  };

  const generateForm = document.querySelector("form.generate");
  if (generateForm) {
    const buttons = () => generateForm.querySelectorAll("button[type=submit]");
    const said = document.getElementById("generate-status");
    let submitted = false;
    generateForm.addEventListener("submit", (e) => {
      if (opensElsewhere(e)) return;  // the pictures come in another tab: this form stays
      if (submitted) { e.preventDefault(); return; }
      submitted = true;
      for (const b of buttons()) b.setAttribute("aria-disabled", "true");
      generateForm.setAttribute("aria-busy", "true");
      if (said) {
        const count = Number(document.getElementById("num_outputs")?.value) || 1;
        said.textContent = e.submitter?.id === "save-scale" ? "Saving the scale…"
          : `Generating ${count} picture${count === 1 ? "" : "s"}… this can take a minute.`;
      }
    });
    // Back to this page from the browser's cache (or a stopped load): it can be sent again.
    window.addEventListener("pageshow", () => {
      submitted = false;
      for (const b of buttons()) b.removeAttribute("aria-disabled");
      generateForm.removeAttribute("aria-busy");
      if (said) said.textContent = "";
    });
  }

  // ---------------------------------------------------------------- small helpers
  document.addEventListener("submit", (e) => {
    const target = e.target;
    if (target instanceof HTMLFormElement && target.classList.contains("confirm")) {
      // A field that must hold a known value (the account's name on the delete form): when it
      // does not, the form is sent without the "cannot be undone" question, as it deletes
      // nothing; the server's answer says why and puts the focus back in the field.
      const expect = target.querySelector("[data-expect]");
      // In any case, as the server compares it (names are ASCII).
      if (expect instanceof HTMLInputElement
          && expect.value.toLowerCase() !== expect.dataset.expect.toLowerCase()) return;
      if (!window.confirm(target.dataset.confirm)) e.preventDefault();
    }
  });
  // One POST at a time, for every form the browser sends itself (Create the account, Sign in,
  // Train, Use this version, Create a key, ...), as for the Generate form above: a double click
  // sent two, the browser cut the first off and showed the second's answer, which the first
  // had made wrong: "that user name is taken" for the account just made (and left signed out),
  // "a training of this model is already queued or running" for the one just started. After
  // the confirmation above (a form it kept back was not sent); the upload's own submit sends
  // nothing itself.
  // Not for good, though: held until the next page, a POST stopped with the browser's Stop (or
  // whose answer never came) left every form of the page dead, saying nothing, until a reload.
  // Another submit is let through AGAIN_AFTER_MS after the first (a double click or a double
  // Enter is well within it), and none is held when the answer goes to another tab or window.
  // Meanwhile the button pressed, and any pressed in vain, show they are busy (aria-busy).
  const AGAIN_AFTER_MS = 5000;
  let pending = null;  // {timer, marked: the elements this marked busy}
  const markBusy = (el) => {
    if (!el || !pending || el.getAttribute("aria-busy") === "true") return;  // marked already
    el.setAttribute("aria-busy", "true");
    pending.marked.push(el);
  };
  const release = () => {
    if (!pending) return;
    clearTimeout(pending.timer);
    for (const el of pending.marked) el.removeAttribute("aria-busy");
    pending = null;
  };
  document.addEventListener("submit", (e) => {
    const target = e.target;
    if (e.defaultPrevented || !(target instanceof HTMLFormElement)) return;
    if ((target.getAttribute("method") ?? "get").toLowerCase() !== "post") return;
    if (opensElsewhere(e)) return;
    if (pending) {
      e.preventDefault();
      markBusy(e.submitter);
      return;
    }
    pending = { timer: setTimeout(release, AGAIN_AFTER_MS), marked: [] };
    markBusy(target);
    markBusy(e.submitter);
  });
  // Back to this page from the browser's cache: its forms can be sent again at once.
  window.addEventListener("pageshow", release);
  // The presets and Copy buttons work only here: without scripts they are hidden, dead.
  document.querySelectorAll("[data-needs-script]").forEach((el) => { el.hidden = false; });
  document.addEventListener("click", (e) => {
    const button = e.target instanceof Element ? e.target.closest("button") : null;
    if (!button) return;
    if (button.classList.contains("copy")) {
      // Said in the status beside the button (a focused button's new text was not reliably
      // read out); where the clipboard cannot be used (an http:// address other than
      // localhost is no secure context: no navigator.clipboard) the text is selected for
      // Ctrl+C: the button did nothing and said nothing.
      const said = document.getElementById(button.dataset.copied ?? "");
      const what = button.dataset.what ?? "the text";
      const say = (words) => { if (said) said.textContent = words; };
      const selectIt = () => {
        const code = button.previousElementSibling;
        if (code) window.getSelection()?.selectAllChildren(code);
      };
      if (!navigator.clipboard) {
        selectIt();
        say(`Could not copy here: the text is selected, press Ctrl+C (or ⌘C) to copy ${what}.`);
      } else {
        navigator.clipboard.writeText(button.dataset.copy).then(
          () => say(`Copied ${what}.`),
          () => { selectIt(); say(`Could not copy: the text is selected, press Ctrl+C (or ⌘C) to copy ${what}.`); });
      }
    } else if (button.classList.contains("preset")) {
      const prompt = document.getElementById("prompt");
      if (prompt) { prompt.value = button.dataset.prompt; prompt.focus(); }
    }
  });
  // An error page's Back goes back in the browser's history when the page before it is one of
  // this site (a refused form's page, which keeps what was typed in it); its link otherwise.
  document.addEventListener("click", (e) => {
    const link = e.target instanceof Element ? e.target.closest("a[data-back]") : null;
    if (!link || history.length < 2 || !document.referrer) return;
    if (new URL(document.referrer).origin !== window.location.origin) return;
    e.preventDefault();
    history.back();
  });
  // ---------------------------------------------------------------- training status
  // The figures are polled every second. A poll that fails (the server restarting, the network
  // gone, a 5xx, which htmx does not swap) left them frozen, as if the training were stuck: a
  // notice says contact was lost, since when, and the time left (stale) is hidden until a poll
  // succeeds again (htmx keeps polling).
  const statusPoll = (e) => (e.detail?.pathInfo?.requestPath ?? "").startsWith(root + "/train/status");
  let lastUpdate = new Date();
  const lostContact = (e) => {
    const notice = document.getElementById("poll-notice");
    if (!statusPoll(e) || !notice) return;
    notice.textContent = "Lost contact with the server, retrying… (last update at "
      + `${lastUpdate.toLocaleTimeString()})`;
    notice.hidden = false;
    for (const left of document.querySelectorAll("#status-figures [data-left]")) left.hidden = true;
  };
  for (const name of ["htmx:sendError", "htmx:responseError", "htmx:timeout"]) {
    document.addEventListener(name, lostContact);
  }
  document.addEventListener("htmx:afterRequest", (e) => {
    const status = e.detail?.xhr?.status ?? 0;
    if (!statusPoll(e) || status < 200 || status >= 300) return;
    lastUpdate = new Date();
    const notice = document.getElementById("poll-notice");
    if (notice) { notice.hidden = true; notice.textContent = ""; }
  });
  // What the training page's live region says: the status and the progress in tens of percent
  // while it runs (not the seconds, which change on every poll), how it ended at the end. Only
  // a change is written, so a screen reader speaks a few times per training, not every second.
  const live = document.getElementById("training-live");
  const progressWords = () => {
    const status = document.querySelector("#status-figures [data-status]")?.dataset.status;
    const bar = document.querySelector("#status-figures progress");
    if (!status) return "";
    const tens = bar ? Math.floor(Number(bar.value) / 10) * 10 : 0;
    return `Training ${status}, ${tens}% done.`;
  };
  let spoken = live ? progressWords() : "";  // what the page showed when it loaded: not read out
  const speak = () => {
    if (!live) return;
    const ended = document.getElementById("ended");
    const words = ended ? ended.textContent.replace(/\s+/g, " ").trim() : progressWords();
    // The end swap took the Cancel button, and the focus with it (or the focus was on the
    // notice of the form just sent, "Training started", which the swap takes with the panel):
    // to how the training ended. The focus says it: written into the live region as well, it
    // was read out twice.
    const focused = document.activeElement;
    if (ended && (focused === null || focused === document.body || focused.id === "done-notice")) {
      spoken = words;
      // Cleared, not left saying "Training processing, 90% done.": a screen reader's reading
      // cursor still found that in the region after the training had ended.
      live.textContent = "";
      ended.focus();
      return;
    }
    if (words && words !== spoken) {
      spoken = words;
      live.textContent = words;
    }
  };
  document.addEventListener("htmx:afterSettle", speak);
  // A poll's figures go into the page piece by piece, only those that changed: swapped whole
  // every second (the same "Status: queued" too), a screen reader reading them lost its place.
  // The answer that finds the training ended (HX-Retarget: the whole panel) is htmx's to swap.
  const refreshFigures = (html) => {
    const current = document.getElementById("status-figures");
    const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("status-figures");
    if (!current || !fresh) return false;
    const old = Array.from(current.children);
    const now = Array.from(fresh.children);
    if (old.length === now.length && old.every((el, i) => el.tagName === now[i].tagName)) {
      old.forEach((el, i) => { if (!el.isEqualNode(now[i])) el.replaceWith(document.adoptNode(now[i])); });
    } else {  // a part came or went (the loss chart, a sample): the figures' parts all anew
      current.replaceChildren(...now.map((el) => document.adoptNode(el)));
    }
    return true;
  };
  document.addEventListener("htmx:beforeSwap", (e) => {
    if (!statusPoll(e) || e.detail.isError || e.detail.xhr?.getResponseHeader("HX-Retarget")) return;
    if (refreshFigures(e.detail.serverResponse ?? "")) {
      e.detail.shouldSwap = false;
      speak();
    }
  });
  // Back from a Delete (the gallery's "Generation deleted"): the focus to the generation next
  // to the one deleted (the address's #g-<id>, or the gallery's heading), not the page's top.
  if (document.getElementById("deleted-note") && window.location.hash) {
    const target = document.getElementById(decodeURIComponent(window.location.hash.slice(1)));
    if (target) target.focus();
  }
})();
