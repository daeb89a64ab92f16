#!/usr/bin/env bash
# Old code against new, alternated in one window (this VM's speed drifts from minute to minute, so
# two tables taken apart do not compare):
#   bash bench/ab.sh REV SOURCE RUNS [merge options...]
# checks REV out beside the working tree (a git worktree), then RUNS times: the old and the new
# code, each with 1 process and with 2 forked ranks (--local-ranks 2); prints wall seconds and
# the run stage of each, grouped. Each run starts as bench/run.py's do: previous output deleted,
# sync, the source read into the page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$1 src=$(realpath "$2") runs=$3
shift 3
old=$(mktemp -d)/old
git worktree add -q --detach "$old" "$rev"
trap 'git worktree remove --force "$old"' EXIT
out=$(mktemp -d)/out
py=$PWD/${VENV:-.venv}/bin/python  # (not realpath: a venv python is a link)
for _ in $(seq "$runs"); do
  for code in old new; do
    for ranks in 1 2; do
      dir=$PWD; [ "$code" = old ] && dir=$old
      rm -rf "$out"; sync
      find "$src" -name '*.pt' -o -name '*.distcp' | xargs cat > /dev/null
      start=$(date +%s.%N)
      (cd "$dir" && "$py" -m distmerge merge --source "$src" --target "$out" --local-ranks "$ranks" \
        --no-progress "$@" > "$out.log" 2>&1)
      end=$(date +%s.%N)
      echo "$code ranks=$ranks $(echo "$end - $start" | bc) $(grep -o 'run [0-9.]*s' "$out.log" | head -1 | tr -d ' ')"
    done
  done
done | sort | awk '{t[$1" "$2] = t[$1" "$2] " " $3 "/" $4} END {for (k in t) print k ":" t[k]}'
rm -rf "$out" "$out.log"
