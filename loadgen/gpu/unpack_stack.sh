#!/usr/bin/env bash
# Unpack .stack/stack.tar.xz (made by loadgen/gpu/stage_stack.sh) on a host without
# network: the Java runtime, the Kafka jars, redis-server and the Python wheels.
#
#   bash loadgen/gpu/unpack_stack.sh [ARCHIVE] [DEST]    # defaults .stack/stack.tar.xz /tmp/stack
#   . /tmp/stack/env.sh                                   # the exports it prints
#
# Installs the wheels into DEST/site (pip --no-index --no-deps --target; unzipped where
# the interpreter has no pip), checks that
# java, redis-server and the packages load, writes DEST/env.sh and prints it.
# Environment: PYTHON (default python3: the interpreter the services will run on).
set -euo pipefail

ARCHIVE="${1:-.stack/stack.tar.xz}"
DEST="${2:-/tmp/stack}"
PYTHON="${PYTHON:-python3}"

rm -rf "$DEST"
mkdir -p "$DEST"
tar -C "$DEST" -xJf "$ARCHIVE"
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
    --target "$DEST/site" "$DEST"/wheels/*.whl
else  # an interpreter without pip: these wheels have no .data/ part, so unzipping is installing
  "$PYTHON" - "$DEST/site" "$DEST"/wheels/*.whl <<'EOF'
import sys
import zipfile

for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
fi

cat > "$DEST/env.sh" <<EOF
export PYTHONPATH="$DEST/site\${PYTHONPATH:+:\$PYTHONPATH}"
export JAVA_HOME="$DEST/jre"
export PATH="$DEST/jre/bin:$DEST/redis/bin:\$PATH"
export QLM_REDIS_SERVER="$DEST/redis/bin/redis-server"
export QLM_KAFKA_LIBS="$DEST/kafka"
EOF

# shellcheck disable=SC1091
. "$DEST/env.sh"
java -version 2>&1 | head -1
redis-server --version
"$PYTHON" - <<'EOF'
import aiokafka, dotenv, grpc, grpc_health.v1.health, grpc_reflection.v1alpha.reflection  # noqa
import hiredis, pydantic, pydantic_settings, redis, structlog  # noqa
print("python packages: grpcio", grpc.__version__, "redis", redis.__version__,
      "aiokafka", aiokafka.__version__, "pydantic", pydantic.VERSION)
EOF
echo "# exports (also in $DEST/env.sh):"
cat "$DEST/env.sh"
