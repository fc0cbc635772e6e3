#!/bin/sh
# The memorization check of docs/sec4.md: the paper's pathological generators on
# Fashion-MNIST, measured with the real-weight FID InceptionV3 (18 layers).
#   sh examples/sec4.sh [OUT]      (needs: apt-get install dataset-fashion-mnist)
set -eu
OUT=${1:-/tmp/fp-sec4}
ENC=${ENC:-fid-inception@128}
export FP_BANK="$OUT/bank"
SETS="src noise2 noise rotate downup shuffle background noise100 fresh"

python examples/fashion_mnist_folders.py "$OUT"
fp baseline build fmnist --train "$OUT/T" --heldout "$OUT/P" --encoder "$ENC" -q
fp synth noise      "$OUT/src" "$OUT/noise2"   --sigma 2     # near copies
fp synth noise      "$OUT/src" "$OUT/noise"    --sigma 25    # the paper's noise level
fp synth noise      "$OUT/src" "$OUT/noise100" --sigma 100   # heavy noise
fp synth rotate     "$OUT/src" "$OUT/rotate"                 # random angle in [-30, 30]
fp synth downup     "$OUT/src" "$OUT/downup"                 # 28 -> 7 -> 28 pixels
fp synth shuffle    "$OUT/src" "$OUT/shuffle"                # 4 x 4 patches, shuffled
fp synth background "$OUT/src" "$OUT/background"             # dark background -> a colour
mkdir -p "$OUT/reports"
for s in $SETS; do
  fp memorization "$OUT/$s" --baseline fmnist -q --json --report "$OUT/reports/$s" \
    > "$OUT/reports/$s.json"
done

# One markdown table: C_T per layer (rows) and set (columns); * = flagged (C_T < -2).
python - "$OUT/reports" $SETS <<'PY'
import json, sys
from pathlib import Path
folder, sets = Path(sys.argv[1]), sys.argv[2:]
reports = {s: json.loads((folder / f"{s}.json").read_text()) for s in sets}
layers = [r["layer"] for r in reports[sets[0]]["layers"]]
print("| layer | " + " | ".join(sets) + " |")
print("|---|" + "---:|" * len(sets))
for i, name in enumerate(layers):
    cells = []
    for s in sets:
        row = reports[s]["layers"][i]
        cells.append("-" if row["ct"] is None else f"{row['ct']:.1f}" + ("*" if row["flagged"] else ""))
    print(f"| {name} | " + " | ".join(cells) + " |")
for s in sets:
    c = reports[s]["copying"]
    print(f"- {s}: scope {c['scope']}; collapsed {c['collapsed'] or 'none'}")
PY
