"""The old path of :mod:`fusedloss.train.recipe`, kept so that ``from fusedloss.train_recipe import
MixedTargetLoss`` still works: this name is bound to that very module (the same objects)."""
import sys

from fusedloss.train import recipe

sys.modules[__name__] = recipe
