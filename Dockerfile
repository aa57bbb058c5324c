# tune-alexnet on the Ray GPU image of the pinned Ray (2.60.0) and Python (3.11), with the pinned torch.
# The Ray version and torch pins are also in pyproject.toml and cluster.yaml; tests/test_aws.py keeps them equal.
#   docker build -t tune-alexnet .
#   docker run --gpus all --shm-size=8g tune-alexnet tune-alexnet sweep --subset 100 --epochs 2
# For the cluster, push it once to a registry you own and name it as docker.image in cluster.yaml: new nodes then
# skip the torch install. With ECR (ACCOUNT and REGION yours):
#   aws ecr create-repository --repository-name tune-alexnet
#   aws ecr get-login-password --region REGION | docker login --username AWS --password-stdin ACCOUNT.dkr.ecr.REGION.amazonaws.com
#   docker tag tune-alexnet ACCOUNT.dkr.ecr.REGION.amazonaws.com/tune-alexnet:0.1.0
#   docker push ACCOUNT.dkr.ecr.REGION.amazonaws.com/tune-alexnet:0.1.0
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
