# tune-alexnet on the Ray GPU image of the pinned Ray (2.60.0) and Python (3.11).
# The Ray version is pinned here, in pyproject.toml and in cluster.yaml; tests/test_cluster.py keeps them equal.
#   docker build -t tune-alexnet .
#   docker run --gpus all --shm-size=8g tune-alexnet tune-alexnet sweep --subset 100 --epochs 2
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/tune-alexnet
# Dependencies first, so code edits do not reinstall torch.
COPY --chown=ray:users pyproject.toml README.md ./
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
COPY --chown=ray:users tune_alexnet ./tune_alexnet
RUN pip install --no-cache-dir -e .

# The base image's own unprivileged user.
USER ray
CMD ["tune-alexnet", "--help"]
