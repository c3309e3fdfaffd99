"""The math of fewstep, in pure PyTorch.

Conventions (DESIGN §2): x_0 ~ N(0, I) is noise, x_1 is data, t in [0, 1];
the straight path x_t = (1 - t) x_0 + t x_1 has target velocity u_t = x_1 - x_0;
every network is called ``model(x, t, y)`` and ``y == num_classes`` means "no class".
"""
