"""Pure decision logic over routing counts and ids: no CUDA calls, no manager."""
