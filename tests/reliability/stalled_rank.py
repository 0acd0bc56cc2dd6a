"""One rank of a 2-process gloo run of train.py in which rank 1 stalls before training (run by test_training)."""
import os
import sys
import time

from tests.scripts import load_script

if __name__ == '__main__':
    train = load_script('train')
    if os.environ['RANK'] == '1':
        train.train_one_epoch = lambda *args, **kwargs: time.sleep(120)
    train.main(sys.argv[1:])
