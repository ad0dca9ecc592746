"""Loss terms as pure functions of tensors, with shapes in their docstrings: SPEAR's (`spear`), policy-gradient
(`policy`) and distillation (`distill`), over one masked mean (`common`)."""
