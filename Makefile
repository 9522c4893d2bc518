# Thin wrappers around scripts/; the scripts are the source of truth (CI runs
# `make test` through .ci/run). Recipes run under /bin/sh and call bash explicitly.

BUF := node_modules/.bin/buf
FORMAT_DIRS := server storage clients tests bench

.PHONY: help deps build protos test run bench format clean

help:
	@echo "modelvault make targets:"
	@echo "  make deps    install build/test dependencies (Debian packages, buf via npm ci)"
	@echo "  make build   deps + configure and build the release preset (build/release)"
	@echo "  make protos  deps + configure the release preset (unpacks googleapis protos for buf)"
	@echo "  make test    the full test run: build, buf lint/format, ctest (SQLite + PostgreSQL),"
	@echo "               sanitizer pass (MODELVAULT_SKIP_SANITIZERS=1 skips it)"
	@echo "  make run     build, migrate and seed .data/modelvault.db, serve on 127.0.0.1:50051"
	@echo "  make bench   deps + build + scripts/bench.sh"
	@echo "  make format  clang-format -i the C++ sources, buf format -w proto"
	@echo "  make clean   stop a leftover test PostgreSQL, remove build/"

deps:
	bash scripts/install-deps.sh

build: deps
	cmake --preset release
	cmake --build --preset release -j2

protos: deps
	cmake --preset release

test:
	bash scripts/test.sh

run:
	bash scripts/run.sh

bench: build
	bash scripts/bench.sh

format:
	@dirs=""; for d in $(FORMAT_DIRS); do if [ -d "$$d" ]; then dirs="$$dirs $$d"; fi; done; \
	if [ -n "$$dirs" ]; then \
	  find $$dirs -type f \( -name '*.cc' -o -name '*.h' \) -print0 | xargs -0 -r clang-format -i; \
	fi
	$(BUF) format -w proto

clean:
	@if [ -d build/pg ]; then bash scripts/pg.sh stop build/pg; fi
	rm -rf build
