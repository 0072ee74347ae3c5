#!/usr/bin/env bash
# Builds `txnflow` (release) at another commit, for a benchmark that compares
# this build with it: `scripts/build-baseline.sh REV OUT [PATCH]`. The commit
# is checked out in a worktree under target/, PATCH (a file of `git apply`)
# applied to it when given, and built with a target directory of its own, so
# this build's binary is never overwritten by it. Built once; OUT is reused
# while it exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REV="$1"
OUT="$2"
PATCH="${3:-}"
if [[ -x "$OUT" ]]; then
  echo "[baseline] $OUT exists (txnflow at $REV)"
  exit 0
fi
SRC="$ROOT/target/baseline-src-$REV"
if [[ ! -d "$SRC" ]]; then
  echo "[baseline] checking out $REV in $SRC"
  git -C "$ROOT" worktree add --detach "$SRC" "$REV" >/dev/null
  if [[ -n "$PATCH" ]]; then
    echo "[baseline] applying $PATCH"
    git -C "$SRC" apply "$(cd "$(dirname "$PATCH")" && pwd)/$(basename "$PATCH")"
  fi
fi
echo "[baseline] building txnflow at $REV (release, its own target directory; the first build takes several minutes)"
CARGO_TARGET_DIR="$ROOT/target/baseline-target" cargo build --release --locked --bin txnflow \
  --manifest-path "$SRC/Cargo.toml" 2>&1 | grep --line-buffered -E '^ *(Compiling txnflow|Finished|error)' || true
mkdir -p "$(dirname "$OUT")"
cp "$ROOT/target/baseline-target/release/txnflow" "$OUT"
git -C "$ROOT" worktree remove --force "$SRC"
echo "[baseline] built $OUT"
