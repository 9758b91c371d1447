# The two commands of the README: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

install:
	@tools/install.sh

# The demo caps each pretraining iteration at DEMO_MINUTES of training (the recipe's own default is 20) and sizes
# the learning-rate schedule to match (2 CPU cores do ~120 updates a minute); `make demo DEMO_MINUTES=20` runs the
# recipe as configured.
DEMO_MINUTES ?= 5
DEMO_OPTS = optim.max_minutes=$(DEMO_MINUTES) optim.max_steps=$$(( $(DEMO_MINUTES) * 120 )) optim.warmup_steps=$$(( $(DEMO_MINUTES) * 15 ))

# The fine-tuning stage (egs/mini_synth/asr) runs ASR_STEPS updates per run (7 runs, two side by side: the 1-hour subset's
# three are left out, at 60 updates they rank nothing); the recipe's own default is 600 updates and both subsets
# (README, "Fine-tuning").
ASR_STEPS ?= 60
# SUPERB's ASR task (a BiLSTM CTC head on frozen features, 600 steps: WER above 90% for every upstream, it cannot rank
# them) leaves the demo to the fine-tuning stage, which measures recognition with the encoder trained;
# `make demo SUPERB_TASKS="pr asr ks qbe sid asv sd er ic sf"` runs all ten.
SUPERB_TASKS ?= pr ks qbe sid asv sd er ic sf

demo: install
	cd egs/mini_synth/hubert && PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh \
	  --iter1-opts "$(DEMO_OPTS)" --iter2-opts "$(DEMO_OPTS)"
	cd egs/mini_synth/superb && PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh --tasks "$(SUPERB_TASKS)"
	cd egs/mini_synth/asr && PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh --steps $(ASR_STEPS) --valid 2 --with-1h false
	@test -f egs/mini_synth/hubert/exp/report.md && echo "report: egs/mini_synth/hubert/exp/report.md"

# Three objectives side by side (issue 30): wav2vec 2.0 and BEST-RQ on the demo corpus with the same tiny model, batch and
# optimiser as HuBERT, each given the training budget of HuBERT's two demo iterations together (2 x DEMO_MINUTES, the
# Gumbel temperature annealed over the same 69% of the run as fairseq's), then PNMI by layer, SUPERB PR / KS / SID and
# the fine-tuned PER on the 10-minute subset beside the demo's HuBERT, untrained and fbank rows (exp/report.md,
# "Objectives"). Runs the demo first where its outputs are missing (finished stages are skipped).
COMPARE_STEPS = $(shell expr 2 \* $(DEMO_MINUTES) \* 120)
COMPARE_OPTS = optim.max_minutes=$(shell expr 2 \* $(DEMO_MINUTES)) optim.max_steps=$(COMPARE_STEPS) \
  optim.warmup_steps=$(shell expr 2 \* $(DEMO_MINUTES) \* 15)
GUMBEL = $(shell python3 -c 'print(f"[2.0,0.5,{0.25 ** (1 / (0.69 * $(COMPARE_STEPS))):.7f}]")')
OBJECTIVES ?= wav2vec2 bestrq
.PHONY: compare
compare: demo
	cd egs/mini_synth/hubert && for o in $(OBJECTIVES); do PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh --objective $$o \
	  --iter1-opts "$(COMPARE_OPTS) $$([ $$o = wav2vec2 ] && echo model.gumbel_temperature=$(GUMBEL))" || exit 1; done
	cd egs/mini_synth/superb && PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh --tasks "pr ks sid" --upstreams \
	  "fbank random:../hubert/exp/hubert_iter1/best ../hubert/exp/hubert_iter1/best ../hubert/exp/hubert_iter2/best $(foreach o,$(OBJECTIVES),../hubert/exp/$(o)/best)"
	cd egs/mini_synth/asr && PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh --steps $(ASR_STEPS) --valid 2 --objectives "$(OBJECTIVES)"
	@echo "report: egs/mini_synth/hubert/exp/report.md (section Objectives)"

# pytest-randomly shuffles the order and reseeds random/numpy per test; `make test` fixes its seed so the order is
# the same on every run (`make test TEST_SEED=N` for another order; the suite must pass under any).
TEST_SEED ?= 29
test: install
	$(PY) -m pytest -p randomly --randomly-seed=$(TEST_SEED) tests

bench: install
	$(PY) tools/bench/features.py

# Mutation testing of the core (masking, pretraining loss and head, label-rate mapping, PNMI, SUPERB metrics, greedy
# CTC decoding, sharding) with mutmut; not part of `make test` or CI. Scores and survivors: tools/mutation/README.md.
.PHONY: mutation
mutation: install
	tools/mutation/run.sh

clean:
	rm -rf $(VENV) egs/mini_synth/hubert/{data,dump,exp} egs/mini_synth/superb/exp egs/mini_synth/asr/exp
