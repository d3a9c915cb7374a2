from restorenet.recipes.common import main

if __name__ == "__main__":
    main()
