# The README's two commands are `make train` and `make test`; each installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
TRAIN_ARGS ?= --task cheetah_run --num_train_steps 125000

.PHONY: install system-deps train test test-slow lint format clean

# Headless MuJoCo rendering needs EGL (Mesa's software renderer where there is no GPU driver).
system-deps:
	@ldconfig -p | grep -q 'libEGL.so.1 ' || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && apt-get install -y -q libegl1 libgl1-mesa-dri libosmesa6; \
	  else echo "Install EGL first (Debian/Ubuntu: sudo apt-get install libegl1 libgl1-mesa-dri)"; exit 1; fi; }

$(BIN)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)" -e '.[dev]'
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/sacae train $(TRAIN_ARGS)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) save log .pytest_cache
