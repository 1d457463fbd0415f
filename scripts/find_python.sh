#!/bin/sh
# Prints the path of a Python 3.12 interpreter, or explains on stderr how to get one and exits 1.
# Order: $PYTHON312, python3.12 on PATH (pyenv shims included), pyenv's versions, common install prefixes.
is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

for candidate in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)"; do
  [ -n "$candidate" ] && is_312 "$candidate" && { echo "$candidate"; exit 0; }
done
pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for candidate in $(ls -d "$pyenv_root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV) \
                 /usr/local/bin/python3.12 /usr/bin/python3.12 /opt/homebrew/bin/python3.12; do
  is_312 "$candidate" && { echo "$candidate"; exit 0; }
done
echo "longctx needs Python 3.12 (jax 0.11 requires >= 3.12) and found none: install it (e.g. 'pyenv install 3.12')" \
     "or point PYTHON312 at an interpreter." >&2
exit 1
