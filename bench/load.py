"""Data loading time: the first load decodes every image and writes the array cache, the second reads it.

python bench/load.py /path/to/cifar10-jpeg
"""

import sys
import time

from tune_alexnet.data import load_cifar10


def main():
    root = sys.argv[1]
    start = time.perf_counter()
    data = load_cifar10(root, progress=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    load_cifar10(root, progress=False)
    second = time.perf_counter() - start
    print(
        f"| load | time |\n| --- | --- |\n| first ({len(data.train_x)} + {len(data.test_x)} images; decodes unless "
        f"already cached) | {first:.2f} s |\n| second (reads the cache) | {second:.2f} s |"
    )


if __name__ == "__main__":
    main()
