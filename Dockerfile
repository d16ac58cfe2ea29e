# syntax=docker/dockerfile:1
# The PGASR runtime image: CUDA + Ray 2.60 + this package with its locked dependencies. Every
# node of a cluster runs it (head, CPU and GPU workers, the KubeRay job submitter), so driver,
# workers and Serve replicas see the same code and the same versions.
#
#   docker build -t CHANGE-ME-registry/pgasr:0.1.0 .
#   docker push CHANGE-ME-registry/pgasr:0.1.0
#
# The tag is the package version (pyproject.toml). The base image's Ray and Python must equal
# the pinned ray==2.60.0 and the Python the tests run on (3.11); GPU nodes need an NVIDIA driver
# recent enough for the CUDA build of the pinned torch wheel. Data, weights and runs are never
# baked in (.dockerignore): they come from the shared mount / object storage at run time.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# Jobs run `python jobs/<stage>.py` relative to this directory (the raylet's working directory
# is the job's), and Serve imports `serve.app` from it.
WORKDIR /home/ray/pgasr
ENV PYTHONPATH=/home/ray/pgasr \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1) Dependencies only, at the versions the tests ran with (requirements.lock), with the
# service's extra: this layer is rebuilt when pyproject.toml or the lock changes, not on
# every edit.
COPY --chown=ray:users pyproject.toml requirements.lock README.md ./
RUN mkdir -p pgasr && touch pgasr/__init__.py \
 && pip install -c requirements.lock -e ".[serve,sam]" \
 && python -c "import ray, torch; assert ray.__version__ == '2.60.0', ray.__version__"

# 2) The code. --no-deps: the line above already pinned everything.
COPY --chown=ray:users . .
RUN pip install --no-deps -e . \
 && python -c "import pgasr, jobs.common"

# No CMD/ENTRYPOINT: the launcher and KubeRay start `ray start ...` themselves.
