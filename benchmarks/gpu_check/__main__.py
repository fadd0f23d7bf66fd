from benchmarks.gpu_check.main import main

if __name__ == "__main__":
    main()
