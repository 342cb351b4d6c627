# Sourced by ./demo.sh and ./test.sh: make the virtual environment once and install
# the project into it (editable), again whenever pyproject.toml changes. Sets VENV.
# SD_TRITON_VENV picks another venv (used as it is).
VENV=${SD_TRITON_VENV:-$PWD/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
_stamp="$VENV/.sd-triton-pyproject.sha256"
_want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -z "${SD_TRITON_VENV:-}" ] && [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ] \
   || ! "$VENV/bin/python" -c "import sd_backend, sd_client, pytriton, pytest" 2>/dev/null; then
  echo "setup: installing sd-triton and its dependencies into $VENV (a few minutes, once)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first: with none installed, a plain `torch` requirement would pull a large CUDA build.
  # 2.13.0 is the CPU build these CPU-only machines keep on disk; a GPU host brings its own torch.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[server,test]" && echo "$_want" > "$_stamp"
fi
export PATH="$VENV/bin:$PATH"
