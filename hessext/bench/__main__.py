"""python -m hessext.bench"""

from hessext.bench.cli import main

main()
