import sys

from bulkembed.bench.cli import main

sys.exit(main())
