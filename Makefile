# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = 0 ] && echo "" || (command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && echo sudo))
CAN_APT := $(shell command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; } && echo yes)

.PHONY: demo test lint bench-smoke data rgb-data venv clean

demo: $(STAMP) data
	$(BIN)/unpoison demo --out demo-out --overwrite

# A failed data install is shown (not hidden) and the suite still runs; its last line says how many
# real-data tests were skipped and why (tests/conftest.py). -rs lists every skip with its reason.
test: $(STAMP)
	@$(MAKE) --no-print-directory data || echo "make test: WARNING: Fashion-MNIST could not be installed (see above); the real-data tests will be skipped" >&2
	$(BIN)/python -m pytest -rs tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,diffusion,ray]'
	touch $(STAMP)

# Debian's Fashion-MNIST: installed with apt when we may, otherwise say how.
data:
	@if [ -f $(FMNIST) ] || [ -n "$$UNPOISON_DATA" ]; then exit 0; fi; \
	if [ "$(CAN_APT)" = yes ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist', or put the four"; \
	  echo "IDX files in a folder and set UNPOISON_DATA to its parent (UNPOISON_DATA/fashion-mnist/)."; exit 1; \
	fi

# The RGB benchmark set `icons` (docs/datasets.md): eight Debian icon-theme packages, fetched with
# `apt-get download` (no install) into ~/.cache/unpoison/icons-src and converted to
# ~/.cache/unpoison/icons/icons.npz (or $UNPOISON_DATA/icons/). Does nothing when the file exists.
# Never needed by the tests. Where the packages cannot be fetched it says so in one line (exit 2).
rgb-data: $(STAMP)
	@if [ "$(CAN_APT)" = yes ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq; fi; \
	$(BIN)/python -m unpoison.data.fetch icons build

clean:
	rm -rf demo-out .pytest_cache
