"""Training: losses, methods (teacher, teacher forcing, diffusion forcing, ODE init, CausVid, Self Forcing
with DMD / SiD / GAN) and the one trainer loop that runs them all."""
