# Sourced by the scripts in .ci: a new virtual environment outside the clone, so that nothing installed on the
# machine by hand can hide a missing or drifted dependency. On exit, the versions it held are printed (a green or
# red result says what it was measured on) and it is removed.
print_versions() {
    python -c 'import platform; print("tested on: python", platform.python_version())'
    pip list 2>/dev/null | grep -i -E '^(torch|transformers|peft|accelerate|datasets|lm.eval|huggingface.hub|tokenizers|safetensors|sae.lens|eai.sparsify|mergekit|numpy) '
}
VENV=$(mktemp -d)
trap 'print_versions; rm -rf "$VENV"' EXIT
python -m venv "$VENV"
source "$VENV/bin/activate"
