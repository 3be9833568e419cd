"""`python -m sem_cls.data.synthetic`: write the built-in dataset (see dataset.main)."""

from sem_cls.data.synthetic.dataset import main

main()
