#!/usr/bin/env bash
# Build .stack/stack.tar.xz: what a GPU host without network, Java or redis-server needs to
# run the real qlm stack (Redis + Kafka + the services' Python packages).
#
#   bash loadgen/gpu/stage_stack.sh            # -> .stack/stack.tar.xz (+ .stack/stack/ tree)
#
# Contents (unpacked by loadgen/gpu/unpack_stack.sh into /tmp/stack):
#   jre/      a Java runtime made by jlink from the local JDK 17: the modules jdeps finds in
#             the Kafka jars plus the ones Kafka loads at run time (RUNTIME_MODULES)
#   kafka/    the Kafka jars (qlm/localstack/kafka-pom.xml), with the native libraries of
#             every platform but linux/amd64 removed from zstd-jni, snappy-java and lz4-java
#   redis/    Debian's redis-server, every shared library it links but glibc's own (lib/),
#             and bin/redis-server, a wrapper that sets LD_LIBRARY_PATH
#   wheels/   cp312 manylinux wheels of the Python packages a bare vLLM host lacks
#
# Needs: the JDK 17 at $JDK (openjdk-17-jdk-headless: jlink, jdeps, jmods), binutils
# (objcopy, for jlink's --strip-native-debug-symbols), /usr/bin/redis-server, pip, zip, xz,
# network for pip and (once) Maven. Environment: JDK, OUT_DIR, PYTHON, KAFKA_VERSION.
# Takes about 4 minutes on 2 cores (mostly xz). `make stack-archive` runs it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
JDK="${JDK:-/usr/lib/jvm/java-17-openjdk-amd64}"
OUT_DIR="${OUT_DIR:-$REPO/.stack}"
PYTHON="${PYTHON:-python3}"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
TREE="$OUT_DIR/stack"
ARCHIVE="$OUT_DIR/stack.tar.xz"
#: Modules Kafka needs at run time that static analysis does not show (reflection, SPI).
RUNTIME_MODULES="jdk.unsupported,java.management,jdk.management,java.naming,java.security.jgss,java.security.sasl,jdk.crypto.ec,jdk.crypto.cryptoki,java.logging,java.xml"
#: Wheels (exact versions: those the project is developed and tested with).
WHEELS=(
  # grpcio at least the version the generated code in qlm/api/v1 checks for
  grpcio==1.85.4 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
  redis==8.1.0 hiredis==3.5.0 aiokafka==0.14.0 async-timeout==5.0.1
  structlog==26.1.0 pydantic-settings==2.14.1 python-dotenv==1.2.2
  # pydantic as the vLLM archive carries it (same versions), so the stack also runs
  # without that archive on the path (e.g. the submit benchmark on the GPU host)
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  # the HTTP front door (ingest --http-port); FastAPI and starlette come with vLLM
  uvicorn==0.55.0 h11==0.16.0 httptools==0.9.0 python-multipart==0.0.34
  # the local stack's certificates (qlm.tls, imported by qlm.localstack.services)
  cryptography==51.0.1 cffi==2.1.1 pycparser==3.12
)

log() { printf '== %s\n' "$*" >&2; }

kafka_libs() {
  # The jars, fetched by qlm.localstack (Maven) into the cache when missing.
  (cd "$REPO" && QLM_KAFKA_VERSION="$KAFKA_VERSION" "$PYTHON" -c \
    'from qlm.localstack.kafka import fetch_kafka_jars; print(fetch_kafka_jars())')
}

module_deps() {
  # Union of jdeps' module lists over every jar. A modular jar is analysed as a plain
  # directory of its classes (jdeps would otherwise try to resolve its `requires`).
  local libs="$1" scratch="$2" jar deps all=""
  for jar in "$libs"/*.jar; do
    if unzip -Z1 "$jar" | grep -c 'module-info.class' >/dev/null; then
      local dir="$scratch/$(basename "$jar" .jar)"
      mkdir -p "$dir" && (cd "$dir" && unzip -q -o "$jar" && rm -rf META-INF/versions \
        && find . -name module-info.class -delete)
      deps=$("$JDK/bin/jdeps" --print-module-deps --ignore-missing-deps -q "$dir" | tail -1)
    else
      deps=$("$JDK/bin/jdeps" --print-module-deps --ignore-missing-deps -q \
        --multi-release 17 "$jar" | tail -1)
    fi
    all="$all,$deps"
  done
  echo "$all,$RUNTIME_MODULES" | tr ',' '\n' | grep -v '^$' | sort -u | paste -sd, -
}

build_jre() {
  # No compression inside the image (--compress=0): xz over the plain module image is
  # 18 MB against 30 MB for xz over a --compress=2 image, whose zip entries xz cannot shrink.
  local modules="$1"
  log "jlink: $modules"
  "$JDK/bin/jlink" --add-modules "$modules" --output "$TREE/jre" \
    --strip-debug --strip-native-debug-symbols=exclude-debuginfo-files \
    --no-header-files --no-man-pages --compress=0
  "$TREE/jre/bin/java" -version 2>&1 | head -1 >&2
}

trim_jars() {
  local libs="$1"
  log "kafka jars from $libs"
  mkdir -p "$TREE/kafka"
  cp "$libs"/*.jar "$TREE/kafka/"
  cd "$TREE/kafka"
  # Keep linux/amd64 only (zip -d fails when nothing matches: tolerate that).
  zip -q -d zstd-jni-*.jar 'aix/*' 'darwin/*' 'freebsd/*' 'win/*' 'linux/aarch64/*' \
    'linux/arm/*' 'linux/i386/*' 'linux/loongarch64/*' 'linux/mips64/*' 'linux/ppc64/*' \
    'linux/ppc64le/*' 'linux/riscv64/*' 'linux/s390x/*' || true
  local native='org/xerial/snappy/native'
  zip -q -d snappy-java-*.jar "$native/AIX/*" "$native/FreeBSD/*" "$native/Mac/*" \
    "$native/Windows/*" "$native/SunOS/*" "$native/Linux/aarch64/*" \
    "$native/Linux/android-*" "$native/Linux/arm/*" "$native/Linux/armv*" \
    "$native/Linux/loongarch64/*" "$native/Linux/ppc/*" "$native/Linux/ppc64/*" \
    "$native/Linux/ppc64le/*" "$native/Linux/riscv64/*" "$native/Linux/s390x/*" \
    "$native/Linux/x86/*" || true
  zip -q -d lz4-java-*.jar 'net/jpountz/util/darwin/*' 'net/jpountz/util/win32/*' \
    'net/jpountz/util/linux/aarch64/*' 'net/jpountz/util/linux/i386/*' \
    'net/jpountz/util/linux/ppc64le/*' 'net/jpountz/util/linux/s390x/*' || true
  # grep reads the whole listing (no -q): with pipefail, grep -q leaving early makes unzip
  # die of SIGPIPE and the check fail although the library is there
  unzip -l zstd-jni-*.jar | grep 'linux/amd64/libzstd-jni' >/dev/null \
    || { echo "zstd-jni lost its linux/amd64 library" >&2; exit 1; }
  unzip -l snappy-java-*.jar | grep 'native/Linux/x86_64/libsnappyjava.so' >/dev/null \
    || { echo "snappy-java lost its Linux/x86_64 library" >&2; exit 1; }
  local jar
  for jar in *.jar; do store_jar "$jar"; done
  cd - >/dev/null
}

store_jar() {
  # Rewrite a jar with stored (uncompressed) entries: the JVM reads it the same, and xz
  # over the whole archive shrinks the jars to 15 MB instead of 31 MB.
  local jar="$1" dir
  dir="$(mktemp -d)"
  (cd "$dir" && unzip -q "$OLDPWD/$jar")
  rm "$jar"
  # META-INF (the manifest) first, as the jar tool writes it.
  (cd "$dir" && { [ ! -d META-INF ] || zip -q -0 -X -r "$OLDPWD/$jar" META-INF; } \
    && zip -q -0 -X -r "$OLDPWD/$jar" .)
  rm -rf "$dir"
}

stage_redis() {
  local bin=/usr/bin/redis-server lib
  log "redis-server $("$bin" --version | cut -d' ' -f3)"
  mkdir -p "$TREE/redis/bin" "$TREE/redis/lib"
  cp "$bin" "$TREE/redis/redis-server.real"
  # Every resolved library but glibc's own (the host's glibc 2.39 is newer than ours).
  for lib in $(ldd "$bin" | awk '/=> \//{print $3}'); do
    case "$(basename "$lib")" in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) ;;
      *) cp -L "$lib" "$TREE/redis/lib/" ;;
    esac
  done
  cat > "$TREE/redis/bin/redis-server" <<'EOF'
#!/bin/sh
# Debian's redis-server with the libraries it was built against.
here="$(cd "$(dirname "$0")/.." && pwd)"
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.real" "$@"
EOF
  chmod +x "$TREE/redis/bin/redis-server"
  "$TREE/redis/bin/redis-server" --version >&2
}

download_wheels() {
  log "wheels"
  mkdir -p "$TREE/wheels"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -d "$TREE/wheels" "${WHEELS[@]}"
}

main() {
  [ -d "$JDK/jmods" ] && [ -x "$JDK/bin/jlink" ] \
    || { echo "no JDK with jmods at $JDK: apt-get install openjdk-17-jdk-headless" >&2; exit 1; }
  rm -rf "$TREE" "$ARCHIVE"
  mkdir -p "$TREE"
  local libs
  SCRATCH="$(mktemp -d)"
  trap 'rm -rf "$SCRATCH"' EXIT
  libs="$(kafka_libs)"
  build_jre "$(module_deps "$libs" "$SCRATCH")"
  trim_jars "$libs"
  stage_redis
  download_wheels
  cp "$REPO/loadgen/gpu/unpack_stack.sh" "$TREE/"
  log "packing $ARCHIVE"
  tar -C "$TREE" -cf - . | xz -9 -T2 > "$ARCHIVE"
  du -sh "$TREE"/* >&2
  ls -l "$ARCHIVE" >&2
  local size
  size=$(stat -c %s "$ARCHIVE")
  if (( size > 58 * 1024 * 1024 )); then
    echo "stack.tar.xz is $size bytes: over the 58 MiB budget" >&2
    exit 1
  fi
}

main "$@"
