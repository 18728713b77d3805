"""hessext inside the libraries users already reach curvature through: `hessext.integrations.curvlinops`
(curvlinops' Hessian and GGN operators on hessext's products, and an exact-diagonal operator) and
`hessext.integrations.laplace` (laplace-torch curvature backends with hessext's exact diagonals and
dense matrices)."""
