import sys

from remote_vector_index_builder.cli import main

sys.exit(main())
