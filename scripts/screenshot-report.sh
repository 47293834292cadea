#!/usr/bin/env bash
# Render a run's HTML report in headless Chromium and save a PNG screenshot of it: the check that
# report.html (tables plus base64-embedded plots) really renders in a browser, and the evidence.
#
#   scripts/screenshot-report.sh [--full-page] [--window-size=W,H] RUN_DIR [OUT_PNG]
#
# OUT_PNG defaults to RUN_DIR/report-screenshot.png. The default window is 1600x3000 CSS px;
# --full-page keeps the width and grows the height to the page's own height (measured in a first
# headless pass), so every table, plot and image grid is in the picture.
#
# Exits non-zero when chromium is missing, RUN_DIR/report.html is missing, Chromium fails, an <img>
# of the page (plot or thumbnail, all base64 data: URIs) fails to decode, or the screenshot is empty
# (no file, zero bytes, or a blank page). Warns on stderr when the page is wider than the window (its
# right-hand part is cut off in the picture: a table overflows).
#
# Needs Debian's Chromium (apt-get install -y chromium) and python3 with Pillow (a flux2bench
# dependency). CHROMIUM=/path/to/binary overrides the binary. Chromium runs as root here, hence
# --no-sandbox; it never reaches the network (file:// URL, background networking off).
# tests/report/test_report_browser.py runs the same check on a hand-made run directory.
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: scripts/screenshot-report.sh [--full-page] [--window-size=W,H] RUN_DIR [OUT_PNG]

Screenshot RUN_DIR/report.html (written by `flux2bench report RUN_DIR`) in headless Chromium.
  OUT_PNG             where to write the PNG (default: RUN_DIR/report-screenshot.png)
  --window-size=W,H   browser window in CSS px (default: 1600,3000)
  --full-page         grow the window height to the page's height, so nothing is cut off below
  CHROMIUM=PATH       environment variable: the Chromium binary (default: chromium on PATH)
EOF
    exit 2
}

die() { echo "screenshot-report: $*" >&2; exit 1; }

window="1600,3000"
full_page=0
positional=()
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage ;;
        --full-page) full_page=1 ;;
        --window-size=*) window="${arg#--window-size=}" ;;
        -*) echo "screenshot-report: unknown option $arg" >&2; usage ;;
        *) positional+=("$arg") ;;
    esac
done
[[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] || usage
[[ "$window" =~ ^[0-9]+,[0-9]+$ ]] || die "--window-size must be W,H in pixels, got '$window'"
width="${window%,*}"

chromium="${CHROMIUM:-chromium}"
command -v "$chromium" >/dev/null 2>&1 \
    || die "'$chromium' not found on PATH; install it with: apt-get update && apt-get install -y chromium"
command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"

run_dir="${positional[0]}"
[[ -d "$run_dir" ]] || die "no such run directory: $run_dir"
run_dir="$(cd "$run_dir" && pwd)"
report="$run_dir/report.html"
[[ -f "$report" ]] || die "no report.html in $run_dir (run: flux2bench report $run_dir)"
out="${positional[1]:-$run_dir/report-screenshot.png}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/chromium.log"

# Root in a container: no sandbox; no GPU, QUIC, first-run, sync, updates or background traffic.
# A fresh profile per call so that no state carries over between runs.
chromium_run() {
    local profile
    profile="$(mktemp -d "$work/profile.XXXXXX")"
    timeout 120 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$profile" "$@" 2>>"$log"
}

# First pass: the page's laid-out size and its images that failed to decode, from a copy that writes
# them into its title once loaded (the report is self-contained, so the copy renders the same).
python3 - "$report" "$work/measure.html" <<'EOF'
import sys
html = open(sys.argv[1], encoding="utf-8").read()
probe = ("<script>addEventListener('load', () => { const e = document.documentElement;"
         " const broken = Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0));"
         " document.title = 'PAGESIZE:' + e.scrollWidth + 'x' + e.scrollHeight + ':BROKEN:' + broken.length"
         " + ':IMAGES:' + document.images.length + ':'; });</script>")
head = html.find("</head>")
open(sys.argv[2], "w", encoding="utf-8").write(html[:head] + probe + html[head:] if head >= 0 else probe + html)
EOF
size="$(chromium_run --window-size="$window" --dump-dom "file://$work/measure.html" \
        | grep -o 'PAGESIZE:[0-9]*x[0-9]*:BROKEN:[0-9]*:IMAGES:[0-9]*:' | head -n 1 || true)"
if [[ -n "$size" ]]; then
    IFS=':x' read -r _ page_w page_h _ broken _ images _ <<<"$size"
    echo "page size: ${page_w}x${page_h} CSS px (window $window); images: $images, broken: $broken"
    if (( page_w > width )); then
        echo "screenshot-report: WARNING: the page is ${page_w}px wide, wider than the ${width}px window:" \
             "its right-hand $((page_w - width))px (a table overflowing) is cut off" >&2
    fi
    if (( full_page )); then
        window="$width,$page_h"
    fi
else
    if (( full_page )); then
        die "could not measure the page height for --full-page; Chromium said: $(tail -n 20 "$log")"
    fi
    echo "screenshot-report: WARNING: could not measure the page (size, broken images); Chromium said:" \
         "$(tail -n 5 "$log")" >&2
    broken=0
fi

# Second pass: the screenshot itself.
rm -f "$out"
if ! chromium_run --window-size="$window" --screenshot="$out" "file://$report" >/dev/null; then
    die "chromium failed; its log: $(tail -n 20 "$log")"
fi
[[ -s "$out" ]] || die "empty screenshot: $out was not written (chromium log: $(tail -n 20 "$log"))"

# A blank page (one colour, e.g. a report that failed to parse) is an empty screenshot too.
python3 - "$out" <<'EOF' || die "empty screenshot: $out is a blank page"
import sys
from PIL import Image
with Image.open(sys.argv[1]) as image:
    image = image.convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    size = image.size
    grey = image.convert("L").histogram()
ink = sum(grey[:240]) / (size[0] * size[1])
n_colours = len(colours) if colours is not None else 1 << 16
print(f"screenshot: {size[0]}x{size[1]} px, {n_colours}{'+' if colours is None else ''} colours, "
      f"{ink:.1%} non-white")
sys.exit(0 if n_colours > 8 and ink > 0.005 else 1)
EOF
echo "wrote $out ($(stat -c %s "$out") bytes)"
(( broken == 0 )) || die "$broken of the page's $images images failed to load or decode (broken <img>); see $out"
