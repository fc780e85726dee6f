from distgpt.cli import main
import sys
sys.exit(main())
