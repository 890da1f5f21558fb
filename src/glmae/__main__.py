from glmae.cli import main

main()
