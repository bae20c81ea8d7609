"""The photos page in Chromium: what it shows of the files chosen and of the report an upload
answers, as a person choosing, adding and sending photos sees it."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.browser.support import PASSWORD, Account, sign_in, upload_photos
from tests.e2e.conftest import ServeProcess, run_cli
from tests.support.photos import FIXTURES, real_photo_zip

pytestmark = pytest.mark.slow

# Three photos of one person: a set that can be trained.
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg")

# The size of the picture at an image's address, once loaded.
PICTURE_SIZE = """(url) => new Promise((done) => { const image = new Image();
    image.onload = () => done([image.naturalWidth, image.naturalHeight]); image.src = url; })"""


def photos_page(chromium: Any, account: Account, *,
                before: Callable[[str, str], None] | None = None) -> tuple[Any, ServeProcess]:
    """The account's photos page, on a server without a worker (a training stays queued);
    ``before`` (base URL, API key) is done before the page is opened."""
    server = account.server
    if before is not None:
        before(server.base_url, account.key)
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, account.name, "/photos")
    return page, server


def photo(name: str, fixture: str) -> dict[str, Any]:
    """A file as the picker gives it: ``fixture``'s photo under ``name``."""
    return {"name": name, "mimeType": "image/jpeg", "buffer": (FIXTURES / fixture).read_bytes()}


def size_of(fixture: str) -> list[int]:
    with Image.open(FIXTURES / fixture) as image:
        return list(image.size)


def shown(page: Any, locator: Any) -> list[int]:
    size: list[int] = page.evaluate(PICTURE_SIZE, locator.get_attribute("src", timeout=5000))
    return size


def send(page: Any) -> None:
    """Send the chosen photos and wait for the answer."""
    page.get_by_role("button", name="Check and upload").click()
    page.wait_for_function("""() => !['Sending…', 'Checking your photos…'].includes(
        document.getElementById('upload-status').textContent)""", timeout=90_000)


def test_a_file_chosen_again_under_the_same_name_shows_its_own_picture(
        chromium: Any, account: Account) -> None:
    """The pictures were kept by file name: choosing another a.jpg showed the first one's
    picture, in the previews and beside the new report (found in review)."""
    page, _server = photos_page(chromium, account)
    page.set_input_files("#files", [photo("a.jpg", "obama.jpg"), photo("b.jpg", "obama2.jpg"),
                                    photo("c.jpg", "obama3.jpg")])
    assert shown(page, page.locator("#previews img").first) == size_of("obama.jpg")
    page.set_input_files("#files", [photo("a.jpg", "biden.jpg"), photo("b.jpg", "obama2.jpg"),
                                    photo("c.jpg", "obama3.jpg")])
    assert shown(page, page.locator("#previews img").first) == size_of("biden.jpg")
    send(page)
    row = page.locator('#report [data-photo-name="a.jpg"]')
    assert shown(page, row.locator("img")) == size_of("biden.jpg")


# Drops files on the drop zone as a person's drag does: those of the picker at ``picked`` (the
# same files again), and new ones (name and base64 bytes).
DROP = """([picked, added]) => {
    const transfer = new DataTransfer();
    const input = document.getElementById('files');
    for (const index of picked) transfer.items.add(input.files[index]);
    for (const [name, data] of added) {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
    }
    const drop = document.getElementById('drop');
    for (const type of ['dragenter', 'drop']) {
        drop.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true,
                                                cancelable: true}));
    }
}"""


def dropped(name: str, fixture: str) -> list[str]:
    return [name, base64.b64encode((FIXTURES / fixture).read_bytes()).decode()]


def test_a_photo_chosen_twice_is_sent_once_and_two_photos_of_one_name_both_are(
        chromium: Any, account: Account) -> None:
    """A photo picked and then dropped again, or two cameras' IMG_0001.JPG, refused the whole
    upload ("two files are named ..."), and no chosen file could be taken out (found in
    review)."""
    page, server = photos_page(chromium, account)
    page.set_input_files("#files", [photo("obama.jpg", "obama.jpg"),
                                    photo("obama2.jpg", "obama2.jpg"),
                                    photo("IMG_0001.JPG", "obama3.jpg")])
    # The same IMG_0001.JPG again; another camera's; and one to take out again.
    page.evaluate(DROP, [[2], [dropped("IMG_0001.JPG", "biden.jpg"),
                               dropped("extra.jpg", "obama_partial_face.jpg")]])
    captions = page.locator("#previews figcaption").all_inner_texts()
    assert captions == ["obama.jpg", "obama2.jpg", "IMG_0001.JPG", "IMG_0001 (2).JPG",
                        "extra.jpg"]
    page.get_by_role("button", name="Remove extra.jpg").click()
    assert page.locator("#previews figcaption").all_inner_texts() == captions[:4]
    focused = page.evaluate("() => document.activeElement.getAttribute('aria-label')")
    assert focused == "Remove IMG_0001 (2).JPG"  # focus stays in the list
    send(page)
    report = page.locator("#report .report")
    assert report.get_attribute("data-trainable") == "true", server.why(report.inner_text())
    first = page.locator('#report [data-photo-name="IMG_0001.JPG"]')
    second = page.locator('#report [data-photo-name="IMG_0001 (2).JPG"]')
    assert shown(page, first.locator("img")) == size_of("obama3.jpg")
    assert shown(page, second.locator("img")) == size_of("biden.jpg")
    assert "left-out" in (second.get_attribute("class") or "")  # another person, as ever


def test_after_an_upload_the_page_shows_the_new_set_and_no_stale_report(
        chromium: Any, account: Account) -> None:
    """After an upload "Current set" still showed the old set; an upload that failed left the
    previous one's "can be trained on" report; and while a training ran the page said photos
    could be uploaded once it ended, though they were taken (found in review)."""
    page, server = photos_page(chromium, account,
                               before=lambda base, key: upload_photos(base, key, start=True))
    notice = page.locator(".notice").inner_text()
    assert "for the next training" in notice, notice
    current = page.locator("#current-set")
    assert "3 of 3 photos kept" in current.inner_text()
    old_thumb = current.locator("img").first.get_attribute("src")
    page.set_input_files("#files", [str(FIXTURES / name) for name in
                                    ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")])
    send(page)
    report = page.locator("#report .report")
    assert report.get_attribute("data-trainable") == "true", server.why(report.inner_text())
    assert "3 of 4 photos kept" in current.inner_text()
    assert current.locator("img").count() == 3
    assert current.locator("img").first.get_attribute("src") != old_thumb
    assert shown(page, current.locator("img").first)[0] > 0  # the new set's own picture
    # The next upload is lost on the way: no report is left from the one before.
    page.route("**/photos/upload", lambda route: route.abort())
    send(page)
    assert "check your connection" in page.locator("#upload-status").inner_text()
    assert page.locator("#report").inner_text().strip() == ""


def test_an_upload_after_the_session_ended_says_so_with_a_way_to_sign_in(
        chromium: Any, account: Account) -> None:
    """The page said only "sign in first" (the server's 401), with no link: its own "Your
    session has ended" never showed (found in review)."""
    page, server = photos_page(chromium, account)
    page.set_input_files("#files", [str(FIXTURES / "obama.jpg")])
    page.context.clear_cookies()  # signed out elsewhere, or the session's time is up
    send(page)
    assert page.locator("#upload-status").inner_text() == \
        "Your session has ended: sign in again, then send the photos."
    page.get_by_role("link", name="sign in again").click()
    page.get_by_label("Name").fill(account.name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{server.base_url}/photos")  # back on the page


def test_a_photo_s_name_is_read_once_not_again_as_its_picture(
        chromium: Any, account: Account) -> None:
    """The thumbnails of the files chosen, of the report and of the current set each had the
    photo's name as alt beside a caption or line saying the same name: a screen reader read
    every name twice (a11y review). The pictures are no images to the accessibility tree now;
    the names are still there, once each."""
    page, _ = photos_page(chromium, account)
    page.set_input_files("#files", [photo("me.jpg", "obama.jpg"), photo("me2.jpg", "obama2.jpg")])
    previews = page.locator("#previews")
    assert previews.locator("img").count() == 2  # the pictures are shown
    assert previews.get_by_role("img").count() == 0
    assert previews.locator("figcaption").all_inner_texts() == ["me.jpg", "me2.jpg"]
    send(page)
    for where in ("#report", "#current-set"):
        assert page.locator(where).get_by_role("img").count() == 0, where


def test_a_name_with_a_quote_or_a_backslash_is_shown_and_found_as_it_is(
        chromium: Any, account: Account) -> None:
    """Chromium sends a '"' in a file's name as %22: the report named 'say %22cheese%22.jpg'
    and found no picture for it on the device; 'back\\slash.JPG', a whole name on Linux
    and macOS, was cut to 'slash.JPG'; and '100%22off.jpg' (its '%' sent as it is) was read
    back as '100"off.jpg', with no picture either."""
    page, server = photos_page(chromium, account)
    page.set_input_files("#files", [photo('say "cheese".jpg', "obama.jpg"),
                                    photo("back\\slash.JPG", "biden.jpg"),
                                    photo("100%22off.jpg", "obama2.jpg")])
    send(page)
    rows = page.locator("#report [data-photo-name]")
    rows.first.wait_for(timeout=5000)
    names = [rows.nth(i).get_attribute("data-photo-name") for i in range(rows.count())]
    assert names == ['say "cheese".jpg', "back\\slash.JPG", "100%22off.jpg"], \
        server.why(page.content())
    assert shown(page, rows.nth(0).locator("img")) == size_of("obama.jpg")
    assert shown(page, rows.nth(1).locator("img")) == size_of("biden.jpg")
    assert shown(page, rows.nth(2).locator("img")) == size_of("obama2.jpg")


def test_a_long_photo_name_does_not_widen_the_page_at_phone_width(
        chromium: Any, account: Account) -> None:
    """A name without spaces, as phones and apps make them, was not broken: at 375 px the
    report and the stored advice, which name each photo in bold and again in its findings,
    were as wide as the name, and the whole page scrolled sideways (822 px)."""
    server = account.server
    page = chromium.new_context(viewport={"width": 375, "height": 800}, is_mobile=True,
                                has_touch=True).new_page()
    sign_in(page, server.base_url, account.name, "/photos")
    long_name = "Screenshot_20230812-153012_Instagram_edited_final_version.jpg"
    page.set_input_files("#files", [photo(long_name, "obama.jpg"),
                                    photo("obama2.jpg", "obama2.jpg"),
                                    photo("obama3.jpg", "obama3.jpg")])
    send(page)
    page.locator(f'#report [data-photo-name="{long_name}"]').wait_for(timeout=5000)
    width = "() => document.documentElement.scrollWidth"
    assert page.evaluate(width) <= 375
    page.reload()  # the advice stored with the set names it too
    assert page.locator(f'#set-advice [data-photo-name="{long_name}"]').count() == 1, \
        server.why(page.content())
    assert page.evaluate(width) <= 375


def test_the_upload_page_at_phone_width(chromium: Any, account: Account, tmp_path: Path) -> None:
    """A zip uploaded on the photos page at a phone's width, and every page of the signed-in
    user no wider than the phone. On the file's shared server with a user of its own: it was
    test_journey's, on a server of its own with a user made by ``users create`` (~10 s of CPU
    for set-up that nothing here is about; that command is still run by test_journey)."""
    server = account.server
    context = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                   has_touch=True)
    page = context.new_page()
    sign_in(page, server.base_url, account.name)
    page.goto(f"{server.base_url}/photos")
    # A zip this time (as a phone's share sheet sends): the kept photos are shown from the
    # server, since the page cannot see inside the zip.
    archive = tmp_path / "selfies.zip"
    archive.write_bytes(real_photo_zip((*PHOTOS, "biden.jpg")))
    page.set_input_files("#files", str(archive))
    page.get_by_role("button", name="Check and upload").click()
    page.locator("#report .report").wait_for(timeout=60_000)
    kept = page.locator('.photo.kept[data-photo-name="obama.jpg"] img')
    assert (kept.get_attribute("src") or "").startswith("/photos/")
    assert page.evaluate("""() => document.querySelector(
        '.photo.kept[data-photo-name="obama.jpg"] img').naturalWidth""") > 0
    assert page.locator('.photo.left-out[data-photo-name="biden.jpg"] .advice').count() >= 1
    for path in ("/photos", "/train", "/versions", "/generate", "/model", "/settings"):
        if path != "/photos":
            page.goto(server.base_url + path)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, (path, width)  # nothing wider than the phone
    page.goto(f"{server.base_url}/photos")
    assert page.get_by_role("button", name="Check and upload").is_visible()
    context.close()
    assert run_cli(["users", "keys", "list", account.name], server.env).returncode == 0


def test_a_double_clicked_upload_is_sent_once(chromium: Any, account: Account) -> None:
    """"Check and upload" stayed clickable while its upload ran: a double click sent two, and
    the server checked and stored the set twice (found in review). The button is disabled
    until the answer, and a second submit meanwhile sends nothing."""
    # The file's shared server (``serve --no-worker``, the local tiny model), as this test's own
    # was, and a user made in this process. It was test_page_actions', whose other test has a
    # server of its own with a worker: that file started two servers.
    server = account.server
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, account.name, "/photos")
    uploads: list[str] = []
    page.on("request", lambda request: uploads.append(request.url)
            if request.method == "POST" and request.url.endswith("/photos/upload") else None)
    page.set_input_files("#files", [str(FIXTURES / name) for name in PHOTOS])
    page.locator("#send").dblclick()
    page.wait_for_function("() => document.getElementById('upload-status').textContent "
                           ".startsWith('Done')", timeout=90_000)
    page.wait_for_timeout(1000)  # a second upload, had one been sent, has been seen by now
    assert len(uploads) == 1, server.why(f"{len(uploads)} uploads sent")
    assert page.locator("#send").is_enabled()  # back for the next upload
