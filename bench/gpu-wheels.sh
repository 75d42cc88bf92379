#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels bench/gpu.sh installs on a GPU machine whose image lacks
# them: TRL, datasets, the pydantic settings stack, and the transformers / peft / huggingface_hub versions this
# project is tested with (the machine's own are older). Pure-Python wheels, plus pydantic-core for CPython 3.12
# on x86-64 (the GPU image's Python). Written to .whl/ (git-ignored; name it in the device run's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pure=(trl==1.16.0 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 huggingface_hub==2.4.0 dill==0.4.1
      pydantic==2.14.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0
      typing-inspection==0.4.5 httpx2==2.16.2 httpcore2==2.16.2 trio==0.35.0 outcome==1.3.0.post0 truststore==0.10.5
      sniffio)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pure[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic-core==2.50.5 multiprocess==0.70.19
du -sh .whl
