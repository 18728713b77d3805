"""hessext inside the libraries users already reach curvature through: `hessext.integrations.curvlinops`
(curvlinops' Hessian and GGN operators on hessext's products, and an exact-diagonal operator)."""
