"""The report opens in headless Chromium (Debian's chromium package): no console errors, and a
screenshot that shows the page (not blank). CI installs chromium (.ci/run); elsewhere the
test is skipped when there is no browser, and never on CI."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.test_report import inputs, report  # noqa: F401 - the fixture is used by name

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="no chromium here (CI installs it: apt-get install chromium)")


def screenshot(page: Path, png: Path) -> str:
    """Headless Chromium's screenshot of a file; returns its log (console messages included)."""
    assert CHROMIUM is not None, "chromium is missing on CI: .ci/run installs it"
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--enable-logging=stderr", "--v=0", "--window-size=1200,5000",
                             f"--screenshot={png}", page.as_uri()],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and png.is_file(), result.stderr[-2000:]
    return result.stdout + result.stderr


def console_messages(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line]


def pixels(png: Path) -> list[tuple[int, ...]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) to pixels."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(line)
        previous = line
    return [tuple(row[x * channels:x * channels + 3]) for row in rows[::4] for x in range(0, width, 4)]


def test_report_renders_without_console_errors_and_is_not_blank(inputs: dict[str, Path],  # noqa: F811
                                                                tmp_path: Path) -> None:
    out = report(inputs, tmp_path / "r")
    log = screenshot(out / "report.html", tmp_path / "report.png")
    assert console_messages(log) == []
    seen = pixels(tmp_path / "report.png")
    ink = sum(1 for p in seen if p != (255, 255, 255)) / len(seen)
    colour = sum(1 for p in seen if max(p) - min(p) > 60) / len(seen)
    assert ink > 0.02  # text, tables and charts
    assert colour > 0.001  # the charts' coloured lines and bars


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The same checks on a page with a console error and on a blank page."""
    noisy = tmp_path / "noisy.html"
    noisy.write_text('<!DOCTYPE html><html><body><script>console.error("broken")</script></body></html>')
    assert any(re.search("broken", line) for line in console_messages(screenshot(noisy, tmp_path / "n.png")))
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    screenshot(blank, tmp_path / "b.png")
    assert all(p == (255, 255, 255) for p in pixels(tmp_path / "b.png"))
