# The two set-up commands of the README: `make demo` and `make test`.
# Each creates (or reuses) the local virtual environment .venv and installs the project first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.morphomol-installed
CORES  ?= 2
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test install lint dry-run clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,spatial]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores 1 --report results/report.html --quiet all
	@echo
	@echo "Demo finished. Outputs:"
	@echo "  fusion:   results/demo/fusion/tables/ (table_a1.md, table_a2.md, per_gene.csv, ttests.csv, plots/)"
	@echo "            results/demo/fusion/runs/<setting>/fold<k>/metrics.json"
	@echo "  samples:  results/demo/samples/<sample>/ (registration.json, registration_qc.png, tiles.*, tokens.zarr, units.h5ad)"
	@echo "  spots:    results/demo_spots/spots/tables/ (spots_settings.md, spots_seeds.md, spots_comparisons.md, summary.png)"
	@echo "            results/demo_spots/spots/samples/<sample>.h5ad, results/demo_spots/spots/maps/, samples/<sample>/spots_qc.json"
	@echo "  cells:    results/demo_cells/cells/tables/ (table_cells.md, ladder.md, modality.md, per_class.csv, plots/)"
	@echo "            results/demo_cells/cells/runs/{llm,untuned,baselines}/fold<k>/, runs/llm/fold<k>/adapter/"
	@echo "  slides:   results/demo_slides/slides/tables/ (retrieval.md, gene_sets_primary.md, controls.md, transfer.md, plots/)"
	@echo "            results/demo_slides/slides/tables/predicted_scores.{csv,h5ad}, folds.tsv, genes.txt, rna_preprocessing.json"
	@echo "  report:   results/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/snakemake --lint

dry-run: $(STAMP)
	$(BIN)/snakemake -n

clean-demo:
	rm -rf results/demo
