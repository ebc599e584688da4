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


def tiny_head(name: str) -> str:
    """A spec's top lines (6-point grid, thresholds 0.4 and 0.6) and the tiny setting: add the
    methods."""
    return f'''
name = "{name}"
grid_points = 6
thresholds = [0.4, 0.6]
''' + TINY_SETTING
