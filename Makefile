# The two commands of the README, and what they need. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test quickstart demo clean-book

# Main job: build the book (executes every chapter at the `cpu` profile on the offline CIFAR-10 data).
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Tests: style, the library, every chapter and solution notebook once under nbval at the `smoke` profile
# (chosen through D2R_PROFILE, with a fresh checkpoint cache), the book build, the exercises.
test: $(STAMP)
	$(PY) -m ruff check d2r_lib tests
	OMP_NUM_THREADS=1 D2R_PROFILE=smoke D2R_CACHE_DIR=$$(mktemp -d) $(PY) -m pytest -n 2 --dist loadfile -q --nbval-lax --nbval-current-env tests book solutions

quickstart: $(STAMP)
	$(PY) -m d2r_lib quickstart

demo: $(STAMP)
	$(PY) -m d2r_lib demo

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

clean-book:
	rm -rf _build
