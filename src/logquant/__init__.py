"""logquant: CNNs in logarithmic data representation (Miyashita, Lee and Murmann, 2016)."""
