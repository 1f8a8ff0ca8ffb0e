# The two commands of the README, and what they need. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

VENDOR := book/_vendor
# Browser assets of the rendered book, pinned; installed from the npm registry, never from a CDN.
NPM_PACKAGES := mathjax@3.2.2 requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15

.PHONY: book test vendor quickstart demo clean-book

# Main job: build the book (executes every chapter at the `cpu` profile on the offline CIFAR-10 data).
book: $(STAMP) $(VENDOR)/.stamp
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Tests: style, the library, every chapter and solution notebook once under nbval at the `smoke` profile
# (chosen through D2R_PROFILE, with a fresh checkpoint cache), the book build, the exercises.
test: $(STAMP) $(VENDOR)/.stamp
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

vendor: $(VENDOR)/.stamp

# MathJax 3 (tex-chtml and its fonts), require.js and the ipywidgets 8 HTML manager (with its fonts), so that
# the HTML pages need no network. Built in a temporary folder and moved into place whole.
$(VENDOR)/.stamp: Makefile book/_ext/widgets-config.js
	rm -rf $(VENDOR) $(VENDOR).tmp && mkdir -p $(VENDOR).tmp/npm $(VENDOR).tmp/out/html-manager
	cd $(VENDOR).tmp/npm && npm init -y >/dev/null && \
		npm install --no-audit --no-fund --ignore-scripts --loglevel=error $(NPM_PACKAGES)
	cp -r $(VENDOR).tmp/npm/node_modules/mathjax/es5 $(VENDOR).tmp/out/mathjax
	cp $(VENDOR).tmp/npm/node_modules/requirejs/require.js $(VENDOR).tmp/out/require.min.js
	cp book/_ext/widgets-config.js $(VENDOR).tmp/out/
	cd $(VENDOR).tmp/npm/node_modules/@jupyter-widgets/html-manager/dist && \
		cp embed-amd.js *.woff *.woff2 *.ttf *.eot *.svg ../../../../../out/html-manager/
	mv $(VENDOR).tmp/out $(VENDOR) && rm -rf $(VENDOR).tmp
	touch $@

clean-book:
	rm -rf _build
