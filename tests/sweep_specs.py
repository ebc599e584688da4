"""Spec fragments shared by the sweep tests."""

# digits-lr, small enough for a test: one setting and its 8-subset ground truth
TINY_SETTING = '''
[[settings]]
name = "digits-lr"
sizes = [150, 40, 30]
recipe = { epochs = 2 }
[groundtruth]
n_subsets = 8
'''
