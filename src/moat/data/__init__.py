"""Data for MOAT: robust image loading, classification datasets and loaders, transforms and the
synthetic demo dataset. Import the submodules directly (`moat.data.classification`, ...): this
package imports nothing so that `import moat` stays free of torchvision and Pillow.
"""
