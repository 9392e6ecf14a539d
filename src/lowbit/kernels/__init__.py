"""CPU kernels for packed layers: native (C++/AVX2, compiled once and cached) and the PyTorch reference.

`native` compiles and binds the C++ kernels; `routes` maps a packed layer's formats to one of them; `dispatch`
picks, per layer and batch size, the faster of the native kernel and the dense reference path.
"""
