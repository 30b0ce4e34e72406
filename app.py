"""Start the Gradio app; the same as ``python -m gen3diffusion.app`` (options: ``python app.py --help``)."""

from gen3diffusion.app import main

if __name__ == "__main__":
    main()
