"""RCIL (Representation Compensation Networks, CVPR 2022): its numerical core.

* :mod:`methods.rcil.branches`: the twin branches and their mixing rule (the network change);
* :mod:`methods.rcil.fold`: folding the two branches into one frozen conv between steps;
* :mod:`methods.rcil.cube`: the pooled cube distillation;
* :mod:`methods.rcil.loss`: RCIL's loss at step > 0 and its classifier initialisation.

The method's wiring (options, preset, lifecycle hooks) comes with the method lifecycle;
docs/behaviour.md ("RCIL") describes the behaviour and its quirks RC1-RC25.
"""
