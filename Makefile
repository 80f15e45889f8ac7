# nbdkit-qcow2: a read-write qcow2 plugin for nbdkit over a standalone core.

CC       ?= gcc
PKG_CONFIG ?= pkg-config
PLUGINDIR ?= $(shell $(PKG_CONFIG) --variable=plugindir nbdkit 2>/dev/null)
MANDIR   ?= /usr/share/man
BINDIR   ?= /usr/local/bin
DESTDIR  ?=

WARN     := -Wall -Wextra -Wno-unused-parameter -Wshadow -Wvla -Werror
CFLAGS   ?= -O2 -g
CFLAGS   += -std=gnu11 -fPIC $(WARN) -D_GNU_SOURCE -pthread
CPPFLAGS += -Iqcow2core $(shell $(PKG_CONFIG) --cflags nbdkit 2>/dev/null)
LIBS     := -lzstd -lz -lnettle -pthread

# `make SANITIZE=1` builds everything with ASan+UBSan into build-san/.
ifeq ($(SANITIZE),1)
BUILD    := build-san
CFLAGS   += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS  += -fsanitize=address,undefined
else
BUILD    := build
endif

CORE_SRCS := $(wildcard qcow2core/*.c)
CORE_OBJS := $(patsubst qcow2core/%.c,$(BUILD)/core/%.o,$(CORE_SRCS))
CORE_LIB  := $(BUILD)/libqcow2core.a
PLUGIN_SO := $(BUILD)/nbdkit-qcow2-plugin.so
UNIT_SRCS := $(wildcard tests/unit/test-*.c)
UNIT_BINS := $(patsubst tests/unit/%.c,$(BUILD)/unit/%,$(UNIT_SRCS))

.PHONY: all deps check check-unit check-bats check-sanitize install uninstall serve clean man

all: $(PLUGIN_SO) $(CORE_LIB) $(UNIT_BINS) $(BUILD)/qcow2-tool
ifneq ($(SANITIZE),1)
all: plugin/nbdkit-qcow2-plugin.so tools/qcow2-tool
endif

# The documented path of the plugin is plugin/nbdkit-qcow2-plugin.so.
plugin/nbdkit-qcow2-plugin.so: build/nbdkit-qcow2-plugin.so
	ln -sf ../build/nbdkit-qcow2-plugin.so $@

$(BUILD)/core/%.o: qcow2core/%.c $(wildcard qcow2core/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(CORE_LIB): $(CORE_OBJS)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/plugin/%.o: plugin/%.c $(wildcard plugin/*.h) qcow2core/qcow2.h
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -fvisibility=hidden -c $< -o $@

PLUGIN_OBJS := $(patsubst plugin/%.c,$(BUILD)/plugin/%.o,$(wildcard plugin/*.c))

$(PLUGIN_SO): $(PLUGIN_OBJS) $(CORE_LIB) plugin/plugin.syms
	$(CC) $(CFLAGS) $(LDFLAGS) -shared -fvisibility=hidden \
	  -Wl,--version-script=plugin/plugin.syms \
	  -o $@ $(PLUGIN_OBJS) $(CORE_LIB) $(LIBS)

# The unit tests link a copy of io.c with the fault-injection hooks,
# which the plugin and the tool are built without; the library's io.o
# is then never pulled in.
FAULT_IO := $(BUILD)/unit/io-faults.o
$(FAULT_IO): qcow2core/io.c $(wildcard qcow2core/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -DQ2_FAULT_INJECTION $(CFLAGS) -c $< -o $@

$(BUILD)/unit/%: tests/unit/%.c $(FAULT_IO) $(CORE_LIB) $(wildcard tests/unit/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Iqcow2core $(CFLAGS) $(LDFLAGS) -o $@ $< $(FAULT_IO) $(CORE_LIB) $(LIBS)

# The image tool; tools/qcow2-tool points at the build like the plugin.
TOOL_OBJS := $(patsubst tools/%.c,$(BUILD)/tools/%.o,$(wildcard tools/*.c))
TOOL_BIN  := $(BUILD)/qcow2-tool

$(BUILD)/tools/%.o: tools/%.c tools/tool.h qcow2core/qcow2.h
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(TOOL_BIN): $(TOOL_OBJS) $(CORE_LIB)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(TOOL_OBJS) $(CORE_LIB) $(LIBS)

# Like the plugin's, the documented path points at the normal build.
tools/qcow2-tool: build/qcow2-tool
	ln -sf ../build/qcow2-tool $@

man: plugin/nbdkit-qcow2-plugin.1 tools/qcow2-tool.1
tools/qcow2-tool.1: tools/qcow2-tool.pod
	podchecker $<
	pod2man --section=1 --center=nbdkit-qcow2 --release=nbdkit-qcow2 $< > $@
plugin/nbdkit-qcow2-plugin.1: plugin/nbdkit-qcow2-plugin.pod
	podchecker $<
	pod2man --section=1 --center=nbdkit --release=nbdkit-qcow2 $< > $@

# Everything build and test need on Debian 12; apt-get is idempotent.
DEPS := nbdkit nbdkit-plugin-dev libnbd-bin python3-libnbd qemu-utils \
        zlib1g-dev libzstd-dev nettle-dev bats fio pkg-config gcc make \
        perl clang libclang-rt-14-dev valgrind
deps:
	@if dpkg -s $(DEPS) >/dev/null 2>&1; then \
	  echo "deps: all installed"; \
	else \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEPS); \
	fi

check: all
	$(MAKE) check-unit check-bats

check-unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

# PLUGIN is what the bats tests load; SANITIZE builds point it at build-san.
check-bats: $(PLUGIN_SO)
	PLUGIN=$(CURDIR)/$(PLUGIN_SO) SANITIZE=$(SANITIZE) bats --tap tests/

# See tests/san-shim.c: lets an ASan-preloaded nbdkit exit after errors.
build-san/san-shim.so: tests/san-shim.c
	@mkdir -p $(dir $@)
	$(CC) -O2 -fPIC -shared -o $@ $<

check-sanitize: build-san/san-shim.so
	$(MAKE) SANITIZE=1 all
	$(MAKE) SANITIZE=1 check-unit check-bats

install: $(PLUGIN_SO) $(TOOL_BIN) man
	install -d $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 0755 $(PLUGIN_SO) $(DESTDIR)$(PLUGINDIR)/nbdkit-qcow2-plugin.so
	install -m 0644 plugin/nbdkit-qcow2-plugin.1 $(DESTDIR)$(MANDIR)/man1/
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 $(TOOL_BIN) $(DESTDIR)$(BINDIR)/qcow2-tool
	install -m 0644 tools/qcow2-tool.1 $(DESTDIR)$(MANDIR)/man1/

uninstall:
	rm -f $(DESTDIR)$(PLUGINDIR)/nbdkit-qcow2-plugin.so \
	      $(DESTDIR)$(MANDIR)/man1/nbdkit-qcow2-plugin.1 \
	      $(DESTDIR)$(BINDIR)/qcow2-tool $(DESTDIR)$(MANDIR)/man1/qcow2-tool.1

# ---- fuzzing (tests/fuzz): libFuzzer targets built with clang, ASan
# and UBSan, the core compiled into each from source in build-fuzz/.
# `make fuzz [FUZZ_TIME=300]` runs every target for FUZZ_TIME seconds on
# fresh seeds plus tests/fuzz/regress/; crashes land in build-fuzz/out/.
# `make check` runs tests/fuzz.bats: the regression inputs and 30 s per
# target (FUZZ_CHECK_TIME).
FUZZ_CC      ?= clang
FUZZ_TIME    ?= 300
FUZZ_CFLAGS  := -std=gnu11 -g -O1 -fno-omit-frame-pointer $(WARN) \
                -D_GNU_SOURCE -pthread -Iqcow2core \
                -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,build-fuzz/%,\
                  $(wildcard tests/fuzz/fuzz-*.c))
FUZZ_CORE_OBJS := $(patsubst qcow2core/%.c,build-fuzz/core/%.o,$(CORE_SRCS))

.PHONY: fuzz fuzz-build
.SECONDARY: $(FUZZ_CORE_OBJS)
build-fuzz/core/%.o: qcow2core/%.c $(wildcard qcow2core/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

build-fuzz/fuzz-%: tests/fuzz/fuzz-%.c tests/fuzz/fuzz-common.h \
                   $(FUZZ_CORE_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< \
	  $(FUZZ_CORE_OBJS) $(LIBS)

build-fuzz/seeds/.stamp: tests/fuzz/make-seeds.sh
	tests/fuzz/make-seeds.sh build-fuzz/seeds
	touch $@

fuzz-build: $(FUZZ_TARGETS) build-fuzz/seeds/.stamp

fuzz: fuzz-build
	@fail=; for t in $(FUZZ_TARGETS); do \
	  tests/fuzz/run-fuzz.sh $$t $(FUZZ_TIME) build-fuzz || fail="$$fail $$t"; \
	done; if [ -n "$$fail" ]; then echo "fuzz: findings in:$$fail"; exit 1; fi

# make serve [FILE=disk.qcow2] [PORT=10809 | SOCKET=/path]
serve: deps
	$(MAKE) all
	@FILE="$(FILE)" PORT="$(PORT)" SOCKET="$(SOCKET)" \
	  PLUGIN="$(CURDIR)/$(PLUGIN_SO)" sh tests/serve.sh

clean:
	rm -rf build build-san build-fuzz plugin/nbdkit-qcow2-plugin.so plugin/nbdkit-qcow2-plugin.1
	rm -f tools/qcow2-tool tools/qcow2-tool.1

# ---- benchmarks (bench/run.py; see docs/BENCHMARKS.md) --------------------
# make bench [QUICK=1] [BENCH_OUT=results.json] [BENCH_ARGS='--only randread']
# Compares the plugin with qemu-nbd and nbdkit-file-plugin on a raw copy.
.PHONY: bench
bench: all
	/usr/bin/python3 bench/run.py $(if $(filter 1 yes,$(QUICK)),--quick) \
	  --plugin $(CURDIR)/plugin/nbdkit-qcow2-plugin.so \
	  $(if $(BENCH_OUT),--output $(BENCH_OUT)) $(BENCH_ARGS)
