"""Knowledge distillation: the teacher's softmax at temperature T as the student's target
(docs/distillation.md). ``ops`` holds the op every backend implements (one read of each
logits row, one write of the student's gradient)."""
from . import ops  # noqa: F401  (registers fusedloss::reference_distill)
