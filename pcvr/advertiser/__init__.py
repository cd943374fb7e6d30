"""The advertiser: conversion ingest, consent policy, pseudonymous keys, randomized response."""
